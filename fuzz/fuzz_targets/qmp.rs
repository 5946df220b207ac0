//! QMP input: any byte stream, decoded message by message as the control socket does.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    for msg in serde_json::Deserializer::from_slice(data).into_iter::<serde_json::Value>() {
        let Ok(msg) = msg else { break };
        match colo_blk::qmp::server::decode(&msg) {
            Ok((cmd, _)) => {
                let _ = format!("{cmd:?}");
            }
            Err((e, _)) => assert!(!e.to_string().is_empty() && !e.class().is_empty()),
        }
    }
});
