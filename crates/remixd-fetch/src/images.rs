//! Image sniffing and bounded decoding.
//!
//! The type comes from the magic bytes, never from a Content-Type header or a file
//! name. Dimensions are read from the header first and checked against the pixel limit;
//! the decoder then runs with `image::Limits` set to those dimensions and a matching
//! allocation cap, so a small file that claims a huge canvas is refused before any
//! large allocation.

use std::io::Cursor;

use bytes::Bytes;
use image::{DynamicImage, ImageFormat, ImageReader};

use crate::FetchError;

/// The accepted image types.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageKind {
    Jpeg,
    Png,
    Webp,
}

impl ImageKind {
    pub fn mime(self) -> &'static str {
        match self {
            ImageKind::Jpeg => "image/jpeg",
            ImageKind::Png => "image/png",
            ImageKind::Webp => "image/webp",
        }
    }

    pub fn extension(self) -> &'static str {
        match self {
            ImageKind::Jpeg => "jpg",
            ImageKind::Png => "png",
            ImageKind::Webp => "webp",
        }
    }

    fn format(self) -> ImageFormat {
        match self {
            ImageKind::Jpeg => ImageFormat::Jpeg,
            ImageKind::Png => ImageFormat::Png,
            ImageKind::Webp => ImageFormat::WebP,
        }
    }
}

/// A downloaded image, checked but not decoded.
#[derive(Debug, Clone)]
pub struct FetchedImage {
    pub bytes: Bytes,
    pub kind: ImageKind,
    pub width: u32,
    pub height: u32,
}

/// The image type from the magic bytes.
pub fn sniff(bytes: &[u8]) -> Option<ImageKind> {
    if bytes.starts_with(&[0xff, 0xd8, 0xff]) {
        Some(ImageKind::Jpeg)
    } else if bytes.starts_with(b"\x89PNG\r\n\x1a\n") {
        Some(ImageKind::Png)
    } else if bytes.len() >= 12 && &bytes[..4] == b"RIFF" && &bytes[8..12] == b"WEBP" {
        Some(ImageKind::Webp)
    } else {
        None
    }
}

/// Type and dimensions from the header, refusing more than `max_pixels`.
pub fn probe(bytes: &[u8], max_pixels: u64) -> Result<(ImageKind, u32, u32), FetchError> {
    let kind = sniff(bytes).ok_or(FetchError::NotImage)?;
    let (w, h) = ImageReader::with_format(Cursor::new(bytes), kind.format())
        .into_dimensions()
        .map_err(|e| FetchError::Decode(e.to_string()))?;
    if w == 0 || h == 0 {
        return Err(FetchError::Decode("the image has no pixels".into()));
    }
    if w as u64 * h as u64 > max_pixels {
        return Err(FetchError::TooManyPixels {
            width: w,
            height: h,
            limit: max_pixels,
        });
    }
    Ok((kind, w, h))
}

fn decode(bytes: &[u8], max_pixels: u64) -> Result<DynamicImage, FetchError> {
    let (kind, w, h) = probe(bytes, max_pixels)?;
    let mut reader = ImageReader::with_format(Cursor::new(bytes), kind.format());
    let mut limits = image::Limits::default();
    limits.max_image_width = Some(w);
    limits.max_image_height = Some(h);
    // Room for the decoded canvas at up to 16 bytes a pixel (RGBA, 32-bit float), plus slack.
    limits.max_alloc = Some(
        (w as u64 * h as u64)
            .saturating_mul(16)
            .saturating_add(64 << 20),
    );
    reader.limits(limits);
    reader
        .decode()
        .map_err(|e| FetchError::Decode(e.to_string()))
}

/// Decodes to 8-bit RGB.
pub fn decode_rgb(bytes: &[u8], max_pixels: u64) -> Result<image::RgbImage, FetchError> {
    decode(bytes, max_pixels).map(|i| i.to_rgb8())
}

/// Decodes to one 8-bit channel (masks).
pub fn decode_luma(bytes: &[u8], max_pixels: u64) -> Result<image::GrayImage, FetchError> {
    decode(bytes, max_pixels).map(|i| i.to_luma8())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encode(img: &DynamicImage, f: ImageFormat) -> Vec<u8> {
        let mut out = Cursor::new(Vec::new());
        img.write_to(&mut out, f).unwrap();
        out.into_inner()
    }

    #[test]
    fn the_three_kinds_sniff_and_decode() {
        let img = DynamicImage::ImageRgb8(image::RgbImage::from_fn(7, 5, |x, y| {
            image::Rgb([x as u8 * 30, y as u8 * 40, 9])
        }));
        for (f, kind) in [
            (ImageFormat::Png, ImageKind::Png),
            (ImageFormat::Jpeg, ImageKind::Jpeg),
            (ImageFormat::WebP, ImageKind::Webp),
        ] {
            let bytes = encode(&img, f);
            assert_eq!(sniff(&bytes), Some(kind));
            assert_eq!(probe(&bytes, 100).unwrap(), (kind, 7, 5));
            let rgb = decode_rgb(&bytes, 100).unwrap();
            assert_eq!(rgb.dimensions(), (7, 5));
            assert_eq!(decode_luma(&bytes, 100).unwrap().dimensions(), (7, 5));
            assert!(matches!(
                probe(&bytes, 34),
                Err(FetchError::TooManyPixels {
                    width: 7,
                    height: 5,
                    limit: 34
                })
            ));
        }
        assert_eq!(
            probe(b"GIF89a\x01\x00\x01\x00", 100).unwrap_err(),
            FetchError::NotImage
        );
        assert_eq!(probe(b"<html>", 100).unwrap_err(), FetchError::NotImage);
    }

    #[test]
    fn a_decompression_bomb_header_is_refused_without_decoding() {
        // A real 1x1 PNG whose IHDR claims 100000 x 100000 (CRC fixed up).
        let mut png = encode(
            &DynamicImage::ImageRgb8(image::RgbImage::new(1, 1)),
            ImageFormat::Png,
        );
        png[16..20].copy_from_slice(&100_000u32.to_be_bytes());
        png[20..24].copy_from_slice(&100_000u32.to_be_bytes());
        let crc = {
            let mut c = 0xffff_ffffu32;
            for &b in &png[12..29] {
                c ^= b as u32;
                for _ in 0..8 {
                    c = if c & 1 != 0 {
                        0xedb8_8320 ^ (c >> 1)
                    } else {
                        c >> 1
                    };
                }
            }
            !c
        };
        png[29..33].copy_from_slice(&crc.to_be_bytes());
        let e = decode_rgb(&png, 40_000_000).unwrap_err();
        assert_eq!(
            e,
            FetchError::TooManyPixels {
                width: 100_000,
                height: 100_000,
                limit: 40_000_000
            }
        );
        assert_eq!(
            e.to_string(),
            "has dimensions 100000x100000, above the limit of 40000000 pixels"
        );
    }

    #[test]
    fn truncated_images_fail_to_decode_cleanly() {
        let img = DynamicImage::ImageRgb8(image::RgbImage::new(64, 64));
        let png = encode(&img, ImageFormat::Png);
        let cut = &png[..png.len() / 2];
        assert!(matches!(
            decode_rgb(cut, 1 << 20),
            Err(FetchError::Decode(_))
        ));
    }
}
