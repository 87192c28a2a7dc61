//! The inventory loader: any text gives an inventory or an error, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(inv) = metaproxy::inventory::Inventory::from_toml_str(text) {
            for i in inv.instances() {
                assert!(inv.instance(&i.uuid).is_some());
            }
        }
    }
});
