//! Resizing for the preview pipeline, on `fast_image_resize`.
//!
//! Every resize in the engine goes through here so that one place maps the task's
//! `rendering_speed` to a filter, and so that the buffer bookkeeping the crate needs
//! (views over flat byte slices, pixel types) stays out of the pipeline code.

use fast_image_resize::images::{Image, ImageRef};
use fast_image_resize::{FilterType, PixelType, ResizeAlg, ResizeOptions, Resizer};
use remixd_domain::RenderingSpeed;

/// The resampling filter for a rendering speed: TURBO bilinear, BALANCED Catmull-Rom,
/// QUALITY Lanczos3, as ENGINES.md fixes it.
pub(crate) fn algorithm(speed: RenderingSpeed) -> ResizeAlg {
    ResizeAlg::Convolution(match speed {
        RenderingSpeed::Turbo => FilterType::Bilinear,
        RenderingSpeed::Balanced => FilterType::CatmullRom,
        RenderingSpeed::Quality => FilterType::Lanczos3,
    })
}

/// Resizes a flat buffer of `pixel_type` pixels, `src_w`×`src_h`, to `dst_w`×`dst_h`.
///
/// `crop` selects the part of the source to use, `(left, top, width, height)`; `None`
/// means a centred cover crop to the destination's aspect ratio (no distortion). An
/// empty source or destination gives a zeroed buffer rather than an error, because the
/// pipeline treats empty inputs as "nothing there" instead of failing the task.
fn resize_raw(
    src: &[u8],
    (src_w, src_h): (u32, u32),
    (dst_w, dst_h): (u32, u32),
    pixel_type: PixelType,
    alg: ResizeAlg,
    crop: Option<(u32, u32, u32, u32)>,
) -> Vec<u8> {
    let len = dst_w as usize * dst_h as usize * pixel_type.size();
    if src_w == 0 || src_h == 0 || dst_w == 0 || dst_h == 0 {
        return vec![0; len];
    }
    let src = ImageRef::new(src_w, src_h, src, pixel_type)
        .expect("source buffer is built to match its dimensions");
    let mut dst = Image::new(dst_w, dst_h, pixel_type);
    let options = ResizeOptions::new().resize_alg(alg);
    let options = match crop {
        Some((left, top, w, h)) => options.crop(left as f64, top as f64, w as f64, h as f64),
        None => options.fit_into_destination(Some((0.5, 0.5))),
    };
    // Alpha handling only matters for RGBA: the cut-out is resized premultiplied so the
    // colour of fully transparent pixels (whatever the reference had outside the mask)
    // cannot bleed into the character's edge.
    let options = options.use_alpha(pixel_type == PixelType::U8x4);
    Resizer::new()
        .resize(&src, &mut dst, &options)
        .expect("crop box lies inside the source and pixel types match");
    let out = dst.into_vec();
    debug_assert_eq!(out.len(), len);
    out
}

/// Cover-crops an RGB image (centred) to the target aspect ratio and resizes it.
pub(crate) fn cover_rgb(
    src: &[u8],
    src_size: (u32, u32),
    dst: (u32, u32),
    alg: ResizeAlg,
) -> Vec<u8> {
    resize_raw(src, src_size, dst, PixelType::U8x3, alg, None)
}

/// Cover-crops an image (centred) to `dst`'s aspect ratio and resizes it with the
/// rendering speed's filter; the local engine prepares its base images with this too.
pub fn cover_resize(
    img: &image::RgbImage,
    dst: (u32, u32),
    speed: RenderingSpeed,
) -> image::RgbImage {
    let raw = cover_rgb(img.as_raw(), img.dimensions(), dst, algorithm(speed));
    image::RgbImage::from_raw(dst.0, dst.1, raw).expect("resize_raw sizes its output to dst")
}

/// Stretches a one-channel image to exactly `dst` (a mask is meant to line up with its
/// reference pixel for pixel, so its aspect ratio is not preserved).
pub(crate) fn stretch_gray(src: &[u8], src_size: (u32, u32), dst: (u32, u32)) -> Vec<u8> {
    // Bilinear whatever the speed: a mask has hard edges and longer filters ring, which
    // would leave faint alpha where the mask is black.
    let alg = ResizeAlg::Convolution(FilterType::Bilinear);
    resize_raw(
        src,
        src_size,
        dst,
        PixelType::U8,
        alg,
        Some((0, 0, src_size.0, src_size.1)),
    )
}

/// Resizes a straight-alpha RGBA image to exactly `dst` (premultiplied internally).
pub(crate) fn stretch_rgba(
    src: &[u8],
    src_size: (u32, u32),
    dst: (u32, u32),
    alg: ResizeAlg,
) -> Vec<u8> {
    resize_raw(
        src,
        src_size,
        dst,
        PixelType::U8x4,
        alg,
        Some((0, 0, src_size.0, src_size.1)),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cover_crop_keeps_the_centre_and_fills_the_frame() {
        // 8×2 source: two red columns, four green, two blue. Covering a square frame
        // crops to the middle two columns; even with the filter reaching a pixel beyond
        // the crop box, only green is sampled, so red and blue must not show at all.
        let mut src = Vec::new();
        for _ in 0..2 {
            for x in 0..8 {
                src.extend_from_slice(match x {
                    0 | 1 => &[255, 0, 0],
                    6 | 7 => &[0, 0, 255],
                    _ => &[0, 255, 0],
                });
            }
        }
        let out = cover_rgb(&src, (8, 2), (16, 16), algorithm(RenderingSpeed::Turbo));
        assert_eq!(out.len(), 16 * 16 * 3);
        for px in out.chunks_exact(3) {
            assert_eq!(px, [0, 255, 0]);
        }
    }

    #[test]
    fn filters_differ_by_speed() {
        // A checkerboard upscaled 3× shows each filter's own overshoot and blur.
        let mut src = Vec::new();
        for y in 0..8u32 {
            for x in 0..8u32 {
                let v = if (x + y) % 2 == 0 { 230 } else { 20 };
                src.extend_from_slice(&[v, v, v]);
            }
        }
        let outs: Vec<_> = [
            RenderingSpeed::Turbo,
            RenderingSpeed::Balanced,
            RenderingSpeed::Quality,
        ]
        .into_iter()
        .map(|s| cover_rgb(&src, (8, 8), (24, 24), algorithm(s)))
        .collect();
        assert_ne!(outs[0], outs[1]);
        assert_ne!(outs[1], outs[2]);
        assert_ne!(outs[0], outs[2]);
    }

    #[test]
    fn empty_inputs_give_zeroed_buffers() {
        assert_eq!(
            cover_rgb(&[], (0, 0), (3, 2), algorithm(RenderingSpeed::Quality)),
            vec![0; 18]
        );
        assert_eq!(stretch_gray(&[], (0, 5), (2, 2)), vec![0; 4]);
        assert!(stretch_rgba(
            &[1, 2, 3, 4],
            (1, 1),
            (0, 3),
            algorithm(RenderingSpeed::Turbo)
        )
        .is_empty());
    }

    #[test]
    fn mask_stretch_matches_the_target_size() {
        let src = vec![255u8; 10 * 4];
        let out = stretch_gray(&src, (10, 4), (7, 13));
        assert_eq!(out.len(), 7 * 13);
        assert!(out.iter().all(|&v| v == 255), "a white mask stays white");
    }
}
