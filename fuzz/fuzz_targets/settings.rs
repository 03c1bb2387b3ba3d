//! The settings loader (`remixd::settings::Settings::from_toml_str`, what `load` makes
//! of a configuration file) on arbitrary text, then the checks the server runs on the
//! result before starting (`check`, the local engine's configuration, the fetcher's
//! address policy): none of it may panic, whatever the file holds.

#![no_main]

use libfuzzer_sys::fuzz_target;
use remixd::settings::Settings;

fuzz_target!(|bytes: &[u8]| {
    let Ok(text) = std::str::from_utf8(bytes) else {
        return;
    };
    let Ok(settings) = Settings::from_toml_str(text) else {
        return;
    };
    let _ = settings.check();
    // `fetch.allow` becomes the fetcher's address policy at start-up.
    if let Ok(policy) = remixd_fetch::AddressPolicy::new(&settings.fetch.allow) {
        let _ = policy.host_allowed("example.com");
    }
    let _ = settings.engine.local.to_config();
    let _ = settings.database_url();
    let _ = format!("{settings:?}");
});
