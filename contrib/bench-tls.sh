#!/bin/bash
# NBD throughput over plain TCP and over TLS (client certificates), colo-blk next to
# qemu-nbd with tls-creds-x509, measured in one run on one machine:
#   - qemu-io writes then reads SIZE through each server (32 MiB requests);
#   - a colo-blk primary copies SIZE to a colo-blk secondary with sync=full (the link's
#     client side), timed from replication-start to "in sync".
# Usage: contrib/bench-tls.sh [SIZE_MIB] [ROUNDS]   (needs target/release/colo-blk, qemu-io,
# qemu-nbd, openssl, socat-free; runs in a temporary directory on /tmp).
set -euo pipefail
SIZE_MIB=${1:-256}
ROUNDS=${2:-3}
BIN=${BIN:-$(cd "$(dirname "$0")/.." && pwd)/target/release/colo-blk}
W=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null; wait 2>/dev/null; rm -rf "$W"' EXIT
cd "$W"
ca() { openssl req -x509 -newkey rsa:2048 -nodes -keyout $1-key.pem -out $1-cert.pem -days 2 -subj "/CN=$1" 2>/dev/null; }
leaf() {
  openssl req -newkey rsa:2048 -nodes -keyout $1-key.pem -out $1.csr -subj "/CN=$1" 2>/dev/null
  printf "$3" > $1.ext
  openssl x509 -req -in $1.csr -CA $2-cert.pem -CAkey $2-key.pem -CAcreateserial -out $1-cert.pem -days 2 -extfile $1.ext 2>/dev/null
}
ca ca
leaf server ca "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\nkeyUsage=digitalSignature,keyEncipherment\n"
leaf client ca "extendedKeyUsage=clientAuth\nkeyUsage=digitalSignature,keyEncipherment\n"
mkdir srv cli
cp ca-cert.pem server-cert.pem server-key.pem srv/
cp ca-cert.pem client-cert.pem client-key.pem cli/

port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() { for _ in $(seq 200); do (exec 3<>/dev/tcp/127.0.0.1/$1) 2>/dev/null && return; sleep 0.05; done; echo "port $1 never opened" >&2; exit 1; }
qmp() { # SOCKET JSON
  python3 - "$1" "$2" <<'PY'
import json, socket, sys
s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); f = s.makefile("rw")
f.readline(); f.write('{"execute":"qmp_capabilities"}\n'); f.flush(); f.readline()
f.write(sys.argv[2] + "\n"); f.flush()
while True:
    m = json.loads(f.readline())
    if "return" in m or "error" in m:
        print(json.dumps(m)); break
PY
}
# qemu-io PORT TLS(0/1) CMD -> MiB/s
qio() {
  local obj=() tls=""
  if [ "$2" = 1 ]; then obj=(--object "tls-creds-x509,id=t0,dir=$W/cli,endpoint=client"); tls=",tls-creds=t0"; fi
  qemu-io "${obj[@]}" --image-opts "driver=nbd,server.type=inet,server.host=127.0.0.1,server.port=$1$tls" -c "$3" \
    | sed -n 's/.*(\([0-9.]*\) \(.iB\)\/sec.*/\1 \2/p' | awk '{v=$1; if ($2=="GiB") v*=1024; if ($2=="KiB") v/=1024; printf "%.0f", v}'
}
colo_secondary() { # PORT TLS DIR
  mkdir -p "$3"; truncate -s ${SIZE_MIB}M "$3/sec.img"
  local t=(); [ "$2" = 1 ] && t=(--nbd-tls-creds "$W/srv")
  "$BIN" serve --socket "$3/v.sock" --qmp "$3/q.sock" --replication secondary --disk "$3/sec.img" --size ${SIZE_MIB}M \
    --active "$3/a.img" --hidden "$3/h.img" --nbd-listen 127.0.0.1:$1 "${t[@]}" 2>"$3/log" &
  SEC_PID=$!
  wait_port $1
  qmp "$3/q.sock" '{"execute":"replication-start","arguments":{"mode":"secondary"}}' >/dev/null
}
qemu_nbd() { # PORT TLS DIR
  mkdir -p "$3"; truncate -s ${SIZE_MIB}M "$3/n.img"
  local t=(); [ "$2" = 1 ] && t=(--object "tls-creds-x509,id=t0,dir=$W/srv,endpoint=server" --tls-creds t0)
  qemu-nbd "${t[@]}" -f raw -x "" -t -b 127.0.0.1 -p $1 --cache=writeback "$3/n.img" 2>"$3/log" &
  wait_port $1
}
sync_time() { # TLS -> seconds for a full sync of SIZE to a fresh colo-blk secondary
  local d="$W/sync$RANDOM" p; p=$(port); colo_secondary $p $1 "$d/s"
  head -c ${SIZE_MIB}M /dev/urandom > "$d/pri.img"
  local t=(); [ "$1" = 1 ] && t=(--secondary-tls-creds "$W/cli")
  "$BIN" serve --socket "$d/pv.sock" --qmp "$d/pq.sock" --replication primary --disk "$d/pri.img" --size ${SIZE_MIB}M \
    --secondary nbd://127.0.0.1:$p/ "${t[@]}" 2>"$d/plog" &
  local pid=$!
  for _ in $(seq 200); do [ -S "$d/pq.sock" ] && break; sleep 0.05; done
  local t0; t0=$(date +%s.%N)
  qmp "$d/pq.sock" '{"execute":"replication-start","arguments":{"mode":"primary","sync":"full"}}' >/dev/null
  until qmp "$d/pq.sock" '{"execute":"query-replication"}' | python3 -c 'import json,sys; q=json.load(sys.stdin)["return"]; sys.exit(0 if q["dirty-bytes"]==0 and q["link"]["inflight"]==0 else 1)'; do sleep 0.02; done
  local t1; t1=$(date +%s.%N)
  local fails; fails=$(qmp "$d/pq.sock" '{"execute":"query-replication"}' | python3 -c 'import json,sys; print(json.load(sys.stdin)["return"]["link"]["failures"])')
  cmp -s "$d/pri.img" "$d/s/sec.img" || { echo "sync: disks differ" >&2; exit 1; }
  kill $pid $SEC_PID; wait $pid $SEC_PID 2>/dev/null || true
  echo "$(echo "$t1 - $t0" | bc) $fails"
}

printf "%-28s %s\n" "server / transport" "write MiB/s (rounds) | read MiB/s (rounds)"
for srvkind in colo-blk qemu-nbd; do
  for tls in 0 1; do
    p=$(port); d="$W/$srvkind-$tls"
    if [ $srvkind = colo-blk ]; then colo_secondary $p $tls "$d"; else qemu_nbd $p $tls "$d"; fi
    w=(); r=()
    for _ in $(seq $ROUNDS); do
      w+=("$(qio $p $tls "write -P 0x5a 0 ${SIZE_MIB}M")")
      r+=("$(qio $p $tls "read -P 0x5a 0 ${SIZE_MIB}M")")
    done
    printf "%-28s %s | %s\n" "$srvkind $([ $tls = 1 ] && echo TLS || echo plain)" "${w[*]}" "${r[*]}"
    kill %% 2>/dev/null || true; wait 2>/dev/null || true
  done
done
for tls in 0 1; do
  for _ in $(seq $ROUNDS); do
    read -r secs fails < <(sync_time $tls)
    printf "colo-blk primary -> secondary sync=full %s: %s MiB in %.2f s = %.0f MiB/s, link failures %s\n" \
      "$([ $tls = 1 ] && echo TLS || echo plain)" $SIZE_MIB "$secs" "$(echo "$SIZE_MIB / $secs" | bc -l)" "$fails"
  done
done
