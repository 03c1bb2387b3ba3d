//! A task's character and style images made into FLUX.2 reference images.
//!
//! The character reference carries its mask into the pixels, since the model takes
//! references as plain images: the reference is cropped to the mask's bounding box (with
//! a margin), so that the character, not the background, fills the reference's tokens;
//! and what lies outside the mask is faded to white, so that nothing of the old
//! background is carried over as if it belonged to the character. Both because klein,
//! like the reference-image models before it, copies from a reference whatever it sees
//! (a background included, when the prompt leaves room), and because its documentation's
//! examples give references as subjects on plain backgrounds. With random weights the
//! tiny test model cannot say which works better; the property that matters here (the
//! background's pixels do not reach the model) is tested.
//!
//! Every reference is then sized as the pipeline sizes references: at most `max_pixels`
//! (the generation's pixel count; the pipeline's cap is 1 MP), sides floored to the
//! model's multiple by a centred crop.

use image::{imageops, GrayImage, Rgb, RgbImage};

/// The margin around the mask's bounding box, as a share of the box's larger side.
const MARGIN: f32 = 0.06;

/// The character with its mask applied: cropped to the mask's bounding box plus a
/// margin, pixels outside the mask faded to white by the mask's value (soft edges stay
/// soft). A mask that selects nothing leaves the reference as it is (the worker already
/// refuses such masks; this is only the engine's own guard). The mask is stretched to
/// the reference's size first.
pub fn masked_character(character: &RgbImage, mask: Option<&GrayImage>) -> RgbImage {
    let Some(mask) = mask else {
        return character.clone();
    };
    let (w, h) = character.dimensions();
    if w == 0 || h == 0 {
        return character.clone();
    }
    let mask = if mask.dimensions() == (w, h) {
        mask.clone()
    } else {
        imageops::resize(mask, w, h, imageops::FilterType::Triangle)
    };
    let Some((x0, y0, x1, y1)) = bounding_box(&mask, 128) else {
        return character.clone();
    };
    let margin = (MARGIN * (x1 - x0).max(y1 - y0) as f32).round() as u32;
    let (x0, y0) = (x0.saturating_sub(margin), y0.saturating_sub(margin));
    let (x1, y1) = ((x1 + margin).min(w), (y1 + margin).min(h));
    let mut out = RgbImage::new(x1 - x0, y1 - y0);
    for (x, y, p) in out.enumerate_pixels_mut() {
        let c = character.get_pixel(x0 + x, y0 + y);
        let a = mask.get_pixel(x0 + x, y0 + y)[0] as f32 / 255.0;
        *p = Rgb(c
            .0
            .map(|v| (a * v as f32 + (1.0 - a) * 255.0).round() as u8));
    }
    out
}

/// The bounding box `(x0, y0, x1, y1)` (exclusive ends) of the pixels at or above
/// `threshold`; `None` when there are none.
fn bounding_box(mask: &GrayImage, threshold: u8) -> Option<(u32, u32, u32, u32)> {
    let mut b: Option<(u32, u32, u32, u32)> = None;
    for (x, y, p) in mask.enumerate_pixels() {
        if p[0] >= threshold {
            b = Some(match b {
                None => (x, y, x + 1, y + 1),
                Some((x0, y0, x1, y1)) => (x0.min(x), y0.min(y), x1.max(x + 1), y1.max(y + 1)),
            });
        }
    }
    b
}

/// A reference sized as the pipeline sizes references: scaled down (Lanczos) to at most
/// `max_pixels` keeping its aspect ratio, then centre-cropped to sides that are
/// multiples of `multiple` (at least one multiple: a smaller image is scaled up to it).
pub fn sized_reference(img: &RgbImage, max_pixels: u64, multiple: u32) -> RgbImage {
    let (w, h) = img.dimensions();
    let pixels = w as u64 * h as u64;
    let mut img = if pixels > max_pixels && pixels > 0 {
        let scale = (max_pixels as f64 / pixels as f64).sqrt();
        let nw = ((w as f64 * scale) as u32).max(1);
        let nh = ((h as f64 * scale) as u32).max(1);
        imageops::resize(img, nw, nh, imageops::FilterType::Lanczos3)
    } else {
        img.clone()
    };
    let (w, h) = img.dimensions();
    if w < multiple || h < multiple {
        let nw = w.max(multiple);
        let nh = h.max(multiple);
        img = imageops::resize(&img, nw, nh, imageops::FilterType::Lanczos3);
    }
    let (w, h) = img.dimensions();
    let (cw, ch) = (w / multiple * multiple, h / multiple * multiple);
    imageops::crop_imm(&img, (w - cw) / 2, (h - ch) / 2, cw, ch).to_image()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_background_outside_the_mask_never_reaches_the_reference() {
        // A red character square on a green background; the mask selects the square.
        let mut c = RgbImage::from_pixel(100, 80, Rgb([0, 200, 0]));
        let mut m = GrayImage::new(100, 80);
        for y in 30..60 {
            for x in 40..70 {
                c.put_pixel(x, y, Rgb([220, 10, 10]));
                m.put_pixel(x, y, image::Luma([255]));
            }
        }
        let r = masked_character(&c, Some(&m));
        // Cropped to the 30×30 box plus a 2-pixel margin on each side.
        assert_eq!(r.dimensions(), (34, 34));
        let mut red = 0;
        for p in r.pixels() {
            assert_ne!(p.0, [0, 200, 0], "background pixel carried over");
            if p.0 == [220, 10, 10] {
                red += 1;
            } else {
                assert_eq!(p.0, [255, 255, 255]);
            }
        }
        assert_eq!(red, 30 * 30, "the character is kept whole");
    }

    #[test]
    fn a_smaller_mask_is_stretched_and_no_mask_keeps_the_image() {
        let c = RgbImage::from_pixel(40, 40, Rgb([9, 9, 9]));
        assert_eq!(masked_character(&c, None), c);
        let m = GrayImage::from_pixel(10, 10, image::Luma([255]));
        assert_eq!(
            masked_character(&c, Some(&m)),
            c,
            "all-white mask: whole image"
        );
        let empty = GrayImage::new(10, 10);
        assert_eq!(masked_character(&c, Some(&empty)), c);
    }

    #[test]
    fn references_are_capped_and_cropped_to_the_multiple() {
        let img = RgbImage::new(300, 200);
        let r = sized_reference(&img, 100 * 100, 16);
        let (w, h) = r.dimensions();
        assert!(w as u64 * h as u64 <= 100 * 100);
        assert_eq!((w % 16, h % 16), (0, 0));
        assert_eq!((w, h), (112, 80)); // 122×81 cropped
        assert_eq!(
            sized_reference(&RgbImage::new(64, 48), 1 << 20, 16).dimensions(),
            (64, 48)
        );
        assert_eq!(
            sized_reference(&RgbImage::new(5, 40), 1 << 20, 16).dimensions(),
            (16, 32)
        );
    }
}
