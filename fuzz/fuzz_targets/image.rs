//! The image path of `remixd_fetch`: sniffing, probing the header and decoding with a
//! pixel limit, on arbitrary bytes. It must never panic, must agree with itself (the
//! decoded size is the probed one, within the limit), and must not allocate much more
//! than the limit allows: `scripts/fuzz.sh` runs this target with libFuzzer's
//! `-malloc_limit_mb` and `-rss_limit_mb`, so one large allocation is a crash.

#![no_main]

use libfuzzer_sys::fuzz_target;
use remixd_fetch::images::{decode_luma, decode_rgb, probe, sniff};
use remixd_fetch::FetchError;

/// 256 × 256 pixels: the decoder may allocate 16 bytes a pixel plus 64 MiB of slack.
const MAX_PIXELS: u64 = 1 << 16;
/// A limit below most inputs' size, for the refusal path.
const TINY: u64 = 64;

fuzz_target!(|bytes: &[u8]| {
    let kind = sniff(bytes);
    let probed = probe(bytes, MAX_PIXELS);
    match (&probed, kind) {
        (Ok((k, w, h)), _) => {
            assert_eq!(Some(*k), kind);
            assert!(*w > 0 && *h > 0 && u64::from(*w) * u64::from(*h) <= MAX_PIXELS);
            // The same header against a smaller limit: refused exactly when over it.
            let small = probe(bytes, TINY);
            if u64::from(*w) * u64::from(*h) > TINY {
                assert!(
                    matches!(small, Err(FetchError::TooManyPixels { .. })),
                    "{small:?}"
                );
            } else {
                assert_eq!(small.ok(), Some((*k, *w, *h)));
            }
        }
        (Err(FetchError::NotImage), None) => {}
        (Err(FetchError::NotImage), Some(k)) => panic!("sniffed {k:?}, probe says not an image"),
        (Err(_), None) => panic!("not sniffed, but probed as an image"),
        (Err(_), Some(_)) => {}
    }
    let rgb = decode_rgb(bytes, MAX_PIXELS);
    let luma = decode_luma(bytes, MAX_PIXELS);
    if let Ok(img) = &rgb {
        let (_, w, h) = probed.as_ref().expect("decoded, so probed");
        assert_eq!(img.dimensions(), (*w, *h));
        assert_eq!(img.as_raw().len(), *w as usize * *h as usize * 3);
    }
    if let Ok(img) = &luma {
        let (_, w, h) = probed.as_ref().expect("decoded, so probed");
        assert_eq!(img.dimensions(), (*w, *h));
    }
    // The conversion differs, the decoding is the same.
    assert_eq!(
        rgb.is_ok(),
        luma.is_ok(),
        "{:?} vs {:?}",
        rgb.err(),
        luma.err()
    );
});
