//! Arbitrary bytes into the policy parser: it must return Ok or Err, never panic, hang or blow the
//! stack. Seeds: `agent/fuzz/seeds/policy_parse/`.
#![no_main]

use ferry::policy::{DEFAULT_ROOT_NAMESPACE, PolicySet};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // Files are read as UTF-8 text, so invalid UTF-8 never reaches the parser.
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(loaded) = PolicySet::parse_str("fuzz.yaml", text, DEFAULT_ROOT_NAMESPACE) {
        // Touch what the CLI prints, so its formatting is exercised too.
        for policy in loaded.set.iter() {
            let _ = policy.to_string();
        }
        for warning in &loaded.warnings {
            let _ = warning.to_string();
        }
    }
});
