//! Images with an EXIF orientation, as phones write them: for the tests of every crate
//! that must show such an image upright.

use image::{ImageEncoder, ImageFormat, RgbImage};

/// A big-endian TIFF block with one IFD entry: Orientation (0x0112, SHORT) = `value`.
pub fn exif_orientation(value: u16) -> Vec<u8> {
    let mut v = b"MM\0\x2a".to_vec();
    v.extend_from_slice(&8u32.to_be_bytes());
    v.extend_from_slice(&1u16.to_be_bytes());
    v.extend_from_slice(&0x0112u16.to_be_bytes());
    v.extend_from_slice(&3u16.to_be_bytes());
    v.extend_from_slice(&1u32.to_be_bytes());
    v.extend_from_slice(&value.to_be_bytes());
    v.extend_from_slice(&[0, 0]);
    v.extend_from_slice(&0u32.to_be_bytes());
    v
}

/// Encodes `img` (RGB8) as `f`, with `exif` in the file's EXIF block when given.
pub fn encode_with_exif(img: &RgbImage, f: ImageFormat, exif: Option<Vec<u8>>) -> Vec<u8> {
    let mut out = Vec::new();
    let (w, h) = img.dimensions();
    let ct = image::ExtendedColorType::Rgb8;
    match f {
        ImageFormat::Jpeg => {
            let mut e = image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, 95);
            if let Some(x) = exif {
                e.set_exif_metadata(x).unwrap();
            }
            e.write_image(img.as_raw(), w, h, ct).unwrap();
        }
        ImageFormat::Png => {
            let mut e = image::codecs::png::PngEncoder::new(&mut out);
            if let Some(x) = exif {
                e.set_exif_metadata(x).unwrap();
            }
            e.write_image(img.as_raw(), w, h, ct).unwrap();
        }
        ImageFormat::WebP => {
            let mut e = image::codecs::webp::WebPEncoder::new_lossless(&mut out);
            if let Some(x) = exif {
                e.set_exif_metadata(x).unwrap();
            }
            e.write_image(img.as_raw(), w, h, ct).unwrap();
        }
        _ => unreachable!(),
    }
    out
}
