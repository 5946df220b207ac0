/*
 * colo-blk test guest: a 512-byte boot sector that does disk I/O forever.
 *
 * SeaBIOS loads it from the (vhost-user-)virtio-blk disk to 0000:7C00 and
 * jumps to it with DL = boot drive.  It never returns to the BIOS.
 *
 * Each iteration:
 *   1. counter += 1                         (stored at CNT before any I/O)
 *   2. lba = 1 + (counter mod NSECT)
 *   3. build a 512-byte record in WBUF (layout below)
 *   4. INT 13h AH=43h (extended write) of WBUF to lba
 *   5. INT 13h AH=42h (extended read) of lba into RBUF
 *   6. compare WBUF and RBUF
 *   7. if all went well: last_completed = counter
 *      otherwise: err_count += 1, last_err = (AH << 8) | kind,
 *                 first_err_counter = counter (only the first time)
 *      and carry on with the next iteration (errors do not halt).
 *   8. busy-wait DELAY TSC cycles (rdtsc), then loop.
 *
 * Guest-physical state block (all little-endian u32), read from outside with
 * QMP human-monitor-command "xp /8wx 0x9000" or pmemsave:
 *   0x9000  counter            iteration in progress (1 = first)
 *   0x9004  last_completed     last counter whose write+read+compare passed
 *   0x9008  err_count
 *   0x900C  last_err           kind in bits 0-7 (1 write CF, 2 read CF,
 *                              3 compare mismatch, 4 no INT13 extensions),
 *                              BIOS status (AH) in bits 8-15
 *   0x9010  first_err_counter  counter of the first failed iteration
 *   0x9014  boot_drive         DL as passed by the BIOS
 *   0x9018  magic              "RUN!" once initialised (0x214E5552)
 *   0x901C  nsect              NSECT (size of the LBA window)
 *   0x9020  cur_lba            LBA of the iteration in progress
 *   0x9024  mm_counter         on the last compare mismatch: counter field
 *                              (bytes 8..11) of what the read returned
 *   0x9028  mm_lba             ... and its lba field (bytes 16..19)
 * Other fixed areas: DAP at 0x9100, WBUF 0x9200-0x93FF, RBUF 0x9400-0x95FF,
 * stack below 0x7C00.
 *
 * On-disk record (sector LBA 1 + c mod NSECT holds the record of counter c):
 *   bytes 0..7    "COLOSECT"
 *   bytes 8..15   counter c (u64 LE; high half 0)
 *   bytes 16..23  lba (u64 LE; high half 0)
 *   bytes 24..511 122 u32 LE words: x0 = c, x(k+1) = x(k) * 1103515245 + 12345
 *                 (mod 2^32), word k = x(k+1)
 * LBA 0 is this boot sector and is never written.
 *
 * Build-time knobs (gas --defsym): NSECT (power of two, default 2048),
 * DELAY (TSC cycles between iterations, default 2000000).
 */
        .code16
        .text
        .globl  _start

        .ifndef NSECT
        .set    NSECT, 2048
        .endif
        .ifndef DELAY
        .set    DELAY, 2000000
        .endif

        .set    ST_CNT,      0x9000
        .set    ST_DONE,     0x9004
        .set    ST_ERRS,     0x9008
        .set    ST_LASTERR,  0x900C
        .set    ST_FIRSTERR, 0x9010
        .set    ST_DRIVE,    0x9014
        .set    ST_MAGIC,    0x9018
        .set    ST_NSECT,    0x901C
        .set    ST_LBA,      0x9020
        .set    ST_MMCNT,    0x9024
        .set    ST_MMLBA,    0x9028
        .set    DAP,         0x9100
        .set    WBUF,        0x9200
        .set    RBUF,        0x9400

        .set    K_WRITE,   1
        .set    K_READ,    2
        .set    K_CMP,     3
        .set    K_NOEXT,   4

_start:
        cli
        ljmp    $0, $norm               /* CS:IP = 0000:7Cxx whatever the BIOS used */
norm:
        xorw    %ax, %ax
        movw    %ax, %ds
        movw    %ax, %es
        movw    %ax, %ss
        movw    $0x7C00, %sp
        sti
        cld

        /* zero the state block, then fill in the constants */
        movw    $ST_CNT, %di
        movw    $(0x40 / 2), %cx
        xorw    %ax, %ax
        rep stosw
        movzbl  %dl, %eax
        movl    %eax, ST_DRIVE
        movl    $NSECT, ST_NSECT

        /* INT 13h extensions present? AH=41h BX=55AAh -> CF=0, BX=AA55h */
        movb    $0x41, %ah
        movw    $0x55AA, %bx
        movb    ST_DRIVE, %dl
        int     $0x13
        jc      noext
        cmpw    $0xAA55, %bx
        je      haveext
noext:
        movb    $K_NOEXT, %bl
        call    record_error
        cli
dead:   hlt
        jmp     dead

haveext:
        movl    $0x214E5552, ST_MAGIC   /* "RUN!" */

mainloop:
        /* 1-2: counter, lba */
        movl    ST_CNT, %eax
        incl    %eax
        movl    %eax, ST_CNT
        movl    %eax, %ebx
        andl    $(NSECT - 1), %ebx
        incl    %ebx
        movl    %ebx, ST_LBA

        /* 3: record */
        movw    $WBUF, %di
        movl    $0x4F4C4F43, 0(%di)     /* "COLO" */
        movl    $0x54434553, 4(%di)     /* "SECT" */
        movl    %eax, 8(%di)
        movl    $0, 12(%di)
        movl    %ebx, 16(%di)
        movl    $0, 20(%di)
        addw    $24, %di
        movl    %eax, %edx
        movw    $122, %cx
fill:
        imull   $1103515245, %edx, %edx
        addl    $12345, %edx
        movl    %edx, (%di)
        addw    $4, %di
        loop    fill

        /* 4: extended write WBUF -> lba */
        movw    $WBUF, %ax
        call    setup_dap
        movw    $0x4300, %ax            /* AH=43h, AL=0: no verify */
        movb    ST_DRIVE, %dl
        movw    $DAP, %si
        int     $0x13
        jnc     wrote
        movb    $K_WRITE, %bl
        call    record_error
        jmp     wait_next
wrote:
        /* 5: extended read lba -> RBUF (clear RBUF first so a no-op read fails) */
        movw    $RBUF, %di
        movw    $256, %cx
        xorw    %ax, %ax
        rep stosw
        movw    $RBUF, %ax
        call    setup_dap
        movb    $0x42, %ah
        movb    ST_DRIVE, %dl
        movw    $DAP, %si
        int     $0x13
        jnc     readok
        movb    $K_READ, %bl
        call    record_error
        jmp     wait_next
readok:
        /* 6: compare */
        movw    $WBUF, %si
        movw    $RBUF, %di
        movw    $128, %cx
        repe cmpsl
        je      same
        movl    RBUF+8, %eax
        movl    %eax, ST_MMCNT
        movl    RBUF+16, %eax
        movl    %eax, ST_MMLBA
        xorb    %ah, %ah
        movb    $K_CMP, %bl
        call    record_error
        jmp     wait_next
same:
        /* 7: done */
        movl    ST_CNT, %eax
        movl    %eax, ST_DONE

wait_next:
        /* 8: wait DELAY TSC cycles */
        rdtsc
        movl    %eax, %ecx
1:
        pause
        rdtsc
        subl    %ecx, %eax
        cmpl    $DELAY, %eax
        jb      1b
        jmp     mainloop

/* DAP for one sector at ST_LBA, buffer 0000:AX */
setup_dap:
        movw    $DAP, %si
        movw    $0x0010, 0(%si)         /* size 16, reserved 0 */
        movw    $1, 2(%si)              /* one sector */
        movw    %ax, 4(%si)             /* buffer offset */
        movw    $0, 6(%si)              /* buffer segment */
        movl    ST_LBA, %eax
        movl    %eax, 8(%si)
        movl    $0, 12(%si)
        ret

/* error bookkeeping: BL = kind, AH = BIOS status */
record_error:
        incl    ST_ERRS
        movb    %bl, %al
        movzwl  %ax, %eax
        movl    %eax, ST_LASTERR
        cmpl    $0, ST_FIRSTERR
        jne     1f
        movl    ST_CNT, %eax
        movl    %eax, ST_FIRSTERR
1:
        ret

        .org    510
        .word   0xAA55
