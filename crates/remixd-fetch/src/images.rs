//! Image sniffing, checking and bounded decoding.
//!
//! The type comes from the magic bytes, never from a Content-Type header or a file
//! name. [`probe`] reads only the header: the dimensions *as displayed* (after the EXIF
//! orientation a phone writes instead of rotating its pixels), checked against the pixel
//! limit, and whether the file is complete (a JPEG must reach its end-of-image marker,
//! a PNG its `IEND` chunk, a WebP the end its RIFF header announces), so a truncated or
//! oversized file is refused when it is fetched or uploaded, before anything decodes it.
//!
//! Decoding ([`decode_rgb_within`], [`decode_luma_within`]) goes straight to 8 bits per
//! channel in the layout the caller wants: PNG through the `png` crate with its 16-to-8
//! bit transformation, row by row into the one output buffer (the `image` crate would
//! decode a 16-bit PNG to a 16-bit canvas first and then copy it down, three times the
//! memory); JPEG and WebP, which are 8-bit anyway, through `image` with limits. The
//! image is then reduced to the size the caller says it needs ([`Reduce`]) and only then
//! turned upright, so the rotation copies the small image, not the large one.
//!
//! [`DecodeGate`] bounds how many decodes run at once in the whole process: a decode
//! briefly holds a full-size canvas (up to `fetch.max_pixels` × 3 bytes), and a burst
//! of tasks must not hold dozens of them at the same time.

use std::io::Cursor;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use fast_image_resize::images::{Image, ImageRef};
use fast_image_resize::{FilterType, PixelType, ResizeAlg, ResizeOptions, Resizer};
use image::metadata::Orientation;
use image::{DynamicImage, GrayImage, ImageDecoder, ImageFormat, ImageReader, RgbImage};
use tokio::sync::Semaphore;

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

/// A downloaded image, checked but not decoded. `width`×`height` is the size as
/// displayed, EXIF orientation applied.
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

/// Whether an orientation swaps width and height.
fn swaps_sides(o: Orientation) -> bool {
    matches!(
        o,
        Orientation::Rotate90
            | Orientation::Rotate270
            | Orientation::Rotate90FlipH
            | Orientation::Rotate270FlipH
    )
}

fn oriented((w, h): (u32, u32), o: Orientation) -> (u32, u32) {
    if swaps_sides(o) {
        (h, w)
    } else {
        (w, h)
    }
}

fn decode_error(e: impl std::fmt::Display) -> FetchError {
    FetchError::Decode(e.to_string())
}

/// Whether the image's EXIF orientation asks for a rotation or a flip, as `probe` and the
/// decoders apply it: the bytes handed elsewhere as they are may be shown the wrong way.
pub fn needs_orientation(bytes: &[u8]) -> bool {
    let Some(kind) = sniff(bytes) else {
        return false;
    };
    ImageReader::with_format(Cursor::new(bytes), kind.format())
        .into_decoder()
        .ok()
        .and_then(|mut d| d.orientation().ok())
        .is_some_and(|o| o != Orientation::NoTransforms)
}

/// Type and displayed dimensions (EXIF orientation applied) from the header, refusing
/// truncated files and more than `max_pixels`.
pub fn probe(bytes: &[u8], max_pixels: u64) -> Result<(ImageKind, u32, u32), FetchError> {
    let kind = sniff(bytes).ok_or(FetchError::NotImage)?;
    check_complete(kind, bytes)?;
    if kind == ImageKind::Webp {
        webp_frames_fit(bytes).map_err(FetchError::Decode)?;
    }
    let mut decoder = ImageReader::with_format(Cursor::new(bytes), kind.format())
        .into_decoder()
        .map_err(decode_error)?;
    // Unreadable EXIF is not worth refusing an image for: it is shown as stored.
    let orientation = decoder.orientation().unwrap_or(Orientation::NoTransforms);
    let (w, h) = oriented(decoder.dimensions(), orientation);
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

/// Refuses a file that ends before its format says it does.
///
/// Written by hand because the decoders are lenient: `image`'s JPEG decoder fills a
/// missing tail with grey and reports success, so "it decodes" does not mean "it is
/// all there". These walks read only the container (segment and chunk lengths), never
/// the compressed pixels, so they cost a pass over the bytes at most.
pub fn check_complete(kind: ImageKind, bytes: &[u8]) -> Result<(), FetchError> {
    match kind {
        ImageKind::Jpeg => jpeg_complete(bytes),
        ImageKind::Png => png_complete(bytes),
        ImageKind::Webp => webp_complete(bytes),
    }
    .map_err(|why| FetchError::Truncated(why.into()))
}

/// Walks a JPEG's marker segments to its end-of-image marker (`FF D9`). Segment
/// lengths are followed, so an embedded EXIF thumbnail's own end marker does not count;
/// after each start-of-scan the entropy-coded data is skipped up to the next marker
/// (`FF 00` is a stuffed data byte, `FF D0`..`FF D7` are restart markers inside it).
fn jpeg_complete(b: &[u8]) -> Result<(), &'static str> {
    const CUT: &str = "the JPEG data ends before its end-of-image marker";
    let mut i = 2; // after SOI
    loop {
        // A marker: one or more 0xFF fill bytes, then the code.
        if b.get(i) != Some(&0xff) {
            return if i >= b.len() {
                Err(CUT)
            } else {
                Err("the JPEG data is malformed (a segment does not start with a marker)")
            };
        }
        while b.get(i) == Some(&0xff) {
            i += 1;
        }
        let Some(&code) = b.get(i) else {
            return Err(CUT);
        };
        i += 1;
        match code {
            0xd9 => return Ok(()),
            // Markers without a length field.
            0x01 | 0xd0..=0xd8 => continue,
            _ => {}
        }
        let Some(len) = b.get(i..i + 2) else {
            return Err(CUT);
        };
        let len = u16::from_be_bytes([len[0], len[1]]) as usize;
        if len < 2 {
            return Err("the JPEG data is malformed (a segment length below 2)");
        }
        i += len;
        if i > b.len() {
            return Err(CUT);
        }
        if code == 0xda {
            // Entropy-coded data up to the next real marker.
            loop {
                let Some(off) = b.get(i..).and_then(|s| s.iter().position(|&x| x == 0xff)) else {
                    return Err(CUT);
                };
                i += off;
                match b.get(i + 1) {
                    None => return Err(CUT),
                    Some(0x00 | 0xd0..=0xd7) => i += 2,
                    Some(_) => break,
                }
            }
        }
    }
}

/// Walks a PNG's chunks to `IEND`; every chunk's data and CRC must be there.
fn png_complete(b: &[u8]) -> Result<(), &'static str> {
    const CUT: &str = "the PNG data ends before its IEND chunk";
    let mut i = 8;
    loop {
        let Some(head) = b.get(i..i + 8) else {
            return Err(CUT);
        };
        let len = u32::from_be_bytes([head[0], head[1], head[2], head[3]]) as usize;
        if len > i32::MAX as usize {
            return Err("the PNG data is malformed (a chunk longer than 2^31 bytes)");
        }
        let kind = &head[4..8];
        i += 8 + len + 4;
        if i > b.len() {
            return Err(CUT);
        }
        if kind == b"IEND" {
            return Ok(());
        }
    }
}

/// Checks that a WebP holds all the bytes its RIFF header announces, and that every
/// chunk inside fits in them.
fn webp_complete(b: &[u8]) -> Result<(), &'static str> {
    const CUT: &str = "the WebP data ends before the end its RIFF header announces";
    let riff = u32::from_le_bytes([b[4], b[5], b[6], b[7]]) as usize;
    let end = 8 + riff;
    if b.len() < end {
        return Err(CUT);
    }
    let mut i = 12;
    while i < end {
        let Some(head) = b.get(i..i + 8).filter(|_| i + 8 <= end) else {
            return Err(CUT);
        };
        let len = u32::from_le_bytes([head[4], head[5], head[6], head[7]]) as usize;
        // Chunks are padded to an even length.
        i += 8 + len + (len & 1);
        if i > end {
            return Err(CUT);
        }
    }
    Ok(())
}

/// Refuses a WebP whose VP8/VP8L frame is larger than its canvas (the `VP8X` size,
/// which is what [`probe`] reports and checks against the pixel limit).
///
/// Written by hand because `image-webp` sizes its frame buffers from the frame header
/// and compares them with the canvas only after decoding: a 543-byte file with a 15×136
/// canvas and an 11535×12328 frame made it allocate 136 MiB (found by the `image` fuzz
/// target; up to 384 MiB for the largest frame header). Reads chunk headers only; the
/// file is complete ([`check_complete`] ran first).
///
/// Fields are read as the decoder reads them, whatever length a chunk declares: the
/// `VP8X` header's 10 bytes even from a chunk that says it has 9 (a second fuzzing
/// find: a 278-byte file whose 9-byte `VP8X` hid its 15×10 canvas from this check
/// while the decoder used it, and whose 15631×7936 frame asked for 118 MiB). Without a
/// `VP8X` chunk the decoder's size is the frame's, which [`probe`] holds to the limit.
fn webp_frames_fit(b: &[u8]) -> Result<(), String> {
    let u24 = |p: &[u8]| u32::from_le_bytes([p[0], p[1], p[2], 0]);
    let mut canvas: Option<(u32, u32)> = None;
    let mut frames: Vec<(u32, u32)> = Vec::new();
    // Top-level chunks, and the chunks inside animation frames (`ANMF`).
    fn walk(b: &[u8], mut i: usize, end: usize, out: &mut Vec<(String, usize, usize)>) {
        while i + 8 <= end {
            let len = u32::from_le_bytes([b[i + 4], b[i + 5], b[i + 6], b[i + 7]]) as usize;
            let body = (i + 8).min(end)..(i + 8 + len).min(end);
            let tag = String::from_utf8_lossy(&b[i..i + 4]).into_owned();
            if tag == "ANMF" && body.len() >= 16 {
                walk(b, body.start + 16, body.end, out);
            }
            out.push((tag, body.start, body.end));
            i += 8 + len + (len & 1);
        }
    }
    let riff_end = (8 + u32::from_le_bytes([b[4], b[5], b[6], b[7]]) as usize).min(b.len());
    let mut chunks = Vec::new();
    walk(b, 12, riff_end, &mut chunks);
    for (tag, start, end) in chunks {
        // At least the 10 bytes of the header fields, as far as the file goes.
        let p = &b[start..end.max(start + 10).min(b.len())];
        match tag.as_str() {
            "VP8X" if p.len() >= 10 => canvas = Some((u24(&p[4..]) + 1, u24(&p[7..]) + 1)),
            // A key frame: 3-byte tag, start code 9d 01 2a, then 14-bit width and height.
            "VP8 " if p.len() >= 10 && p[3..6] == [0x9d, 0x01, 0x2a] => frames.push((
                u32::from(u16::from_le_bytes([p[6], p[7]]) & 0x3fff),
                u32::from(u16::from_le_bytes([p[8], p[9]]) & 0x3fff),
            )),
            // Signature 0x2f, then 14 bits of width − 1 and 14 of height − 1.
            "VP8L" if p.len() >= 5 && p[0] == 0x2f => {
                let v = u32::from_le_bytes([p[1], p[2], p[3], p[4]]);
                frames.push(((v & 0x3fff) + 1, ((v >> 14) & 0x3fff) + 1));
            }
            _ => {}
        }
    }
    if let Some((cw, ch)) = canvas {
        if let Some((w, h)) = frames.iter().copied().find(|&(w, h)| w > cw || h > ch) {
            return Err(format!(
                "its {w}x{h} frame does not fit its {cw}x{ch} canvas"
            ));
        }
    }
    Ok(())
}

/// How far a decoded image may be reduced right after decoding. Never enlarges; the
/// aspect ratio is kept. Sizes are of the image as displayed (orientation applied).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reduce {
    /// Keep every pixel.
    Keep,
    /// As small as possible while still covering `w`×`h` (both sides at least these).
    Cover(u32, u32),
    /// As large as possible while fitting inside `w`×`h`.
    Fit(u32, u32),
}

impl Reduce {
    /// The reduced size of a `w`×`h` image, or `None` when it stays as it is.
    pub fn target(self, w: u32, h: u32) -> Option<(u32, u32)> {
        let (bw, bh) = match self {
            Reduce::Keep => return None,
            Reduce::Cover(bw, bh) | Reduce::Fit(bw, bh) => (bw.max(1) as f64, bh.max(1) as f64),
        };
        if w == 0 || h == 0 {
            return None;
        }
        let (sx, sy) = (bw / w as f64, bh / h as f64);
        let s = match self {
            Reduce::Cover(..) => sx.max(sy),
            _ => sx.min(sy),
        };
        if s >= 1.0 {
            return None;
        }
        let side = |n: u32, bound: f64| {
            let v = (n as f64 * s).round() as u32;
            match self {
                // Rounding must not leave a covering image a pixel short of its bound.
                Reduce::Cover(..) => v.max(bound as u32).min(n),
                _ => v.clamp(1, n),
            }
        };
        Some((side(w, bw), side(h, bh)))
    }
}

/// What a decode produces: three channels or one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Layout {
    Rgb,
    Luma,
}

impl Layout {
    fn channels(self) -> usize {
        match self {
            Layout::Rgb => 3,
            Layout::Luma => 1,
        }
    }
}

/// Decodes to 8-bit RGB, upright (EXIF orientation applied), at full size.
pub fn decode_rgb(bytes: &[u8], max_pixels: u64) -> Result<RgbImage, FetchError> {
    decode_rgb_within(bytes, max_pixels, Reduce::Keep)
}

/// Decodes to one 8-bit channel (masks), upright, at full size.
pub fn decode_luma(bytes: &[u8], max_pixels: u64) -> Result<GrayImage, FetchError> {
    decode_luma_within(bytes, max_pixels, Reduce::Keep)
}

/// Decodes to 8-bit RGB, reduced as `reduce` allows, upright.
pub fn decode_rgb_within(
    bytes: &[u8],
    max_pixels: u64,
    reduce: Reduce,
) -> Result<RgbImage, FetchError> {
    let (w, h, px, o) = decode(bytes, max_pixels, reduce, Layout::Rgb)?;
    let img = RgbImage::from_raw(w, h, px).expect("the decoder sized the buffer");
    Ok(upright(DynamicImage::ImageRgb8(img), o).into_rgb8())
}

/// Decodes to one 8-bit channel, reduced as `reduce` allows, upright.
pub fn decode_luma_within(
    bytes: &[u8],
    max_pixels: u64,
    reduce: Reduce,
) -> Result<GrayImage, FetchError> {
    let (w, h, px, o) = decode(bytes, max_pixels, reduce, Layout::Luma)?;
    let img = GrayImage::from_raw(w, h, px).expect("the decoder sized the buffer");
    Ok(upright(DynamicImage::ImageLuma8(img), o).into_luma8())
}

fn upright(mut img: DynamicImage, o: Orientation) -> DynamicImage {
    img.apply_orientation(o);
    img
}

/// Decodes and reduces; answers the stored (not yet upright) size, the pixels and the
/// orientation still to apply.
fn decode(
    bytes: &[u8],
    max_pixels: u64,
    reduce: Reduce,
    layout: Layout,
) -> Result<(u32, u32, Vec<u8>, Orientation), FetchError> {
    let (kind, uw, uh) = probe(bytes, max_pixels)?;
    let (w, h, px, o) = match kind {
        ImageKind::Png => decode_png(bytes, uw.max(uh), layout)?,
        _ => decode_with_image(bytes, kind, (uw, uh), layout)?,
    };
    // The bound is for the upright image; the pixels are still as stored.
    let Some(target) = reduce.target(uw, uh) else {
        return Ok((w, h, px, o));
    };
    let (tw, th) = oriented(target, o);
    let px = resize(&px, (w, h), (tw, th), layout);
    Ok((tw, th, px, o))
}

/// Room for the decoder's own buffers (rows, the inflate window, metadata chunks).
fn png_limits(width: u32) -> png::Limits {
    png::Limits {
        bytes: (width as usize).saturating_mul(8 * 4) + (64 << 20),
    }
}

/// PNG through the `png` crate: palettes expanded and 16-bit samples cut to 8 by the
/// decoder itself, each row converted into the output as it comes (interlaced images,
/// whose rows arrive in seven passes, go through one 8-bit frame first).
fn decode_png(
    bytes: &[u8],
    longest_side: u32,
    layout: Layout,
) -> Result<(u32, u32, Vec<u8>, Orientation), FetchError> {
    let mut decoder = png::Decoder::new_with_limits(Cursor::new(bytes), png_limits(longest_side));
    decoder.set_transformations(png::Transformations::normalize_to_color8());
    let mut reader = decoder.read_info().map_err(decode_error)?;
    let (w, h) = (reader.info().width, reader.info().height);
    let orientation = reader
        .info()
        .exif_metadata
        .as_deref()
        .and_then(Orientation::from_exif_chunk)
        .unwrap_or(Orientation::NoTransforms);
    let (colour, depth) = reader.output_color_type();
    if depth != png::BitDepth::Eight {
        return Err(FetchError::Decode(format!(
            "unexpected PNG output depth {depth:?}"
        )));
    }
    let mut out = Vec::with_capacity(w as usize * h as usize * layout.channels());
    if reader.info().interlaced {
        let size = reader
            .output_buffer_size()
            .ok_or_else(|| FetchError::Decode("the PNG frame does not fit in memory".into()))?;
        let mut frame = vec![0u8; size];
        let info = reader.next_frame(&mut frame).map_err(decode_error)?;
        for row in frame.chunks_exact(info.line_size).take(h as usize) {
            convert_row(row, colour, layout, w as usize, &mut out);
        }
    } else {
        while let Some(row) = reader.next_row().map_err(decode_error)? {
            convert_row(row.data(), colour, layout, w as usize, &mut out);
        }
    }
    reader.finish().map_err(decode_error)?;
    if out.len() != w as usize * h as usize * layout.channels() {
        return Err(FetchError::Decode(
            "the PNG has fewer rows than it says".into(),
        ));
    }
    Ok((w, h, out, orientation))
}

/// Luma from 8-bit RGB with the weights `image` uses (Rec. 709), so a colour mask
/// reads the same through either decoder.
fn luma(r: u8, g: u8, b: u8) -> u8 {
    ((2126 * r as u32 + 7152 * g as u32 + 722 * b as u32) / 10_000) as u8
}

/// Appends one 8-bit row of `colour` samples to `out` in `layout` (alpha dropped, as
/// `image`'s conversions drop it).
fn convert_row(row: &[u8], colour: png::ColorType, layout: Layout, w: usize, out: &mut Vec<u8>) {
    use png::ColorType as C;
    let samples = colour.samples();
    let row = &row[..w * samples];
    match (colour, layout) {
        (C::Rgb, Layout::Rgb) | (C::Grayscale, Layout::Luma) => out.extend_from_slice(row),
        (C::Grayscale | C::GrayscaleAlpha, Layout::Rgb) => {
            for p in row.chunks_exact(samples) {
                out.extend_from_slice(&[p[0], p[0], p[0]]);
            }
        }
        (C::Rgba, Layout::Rgb) => {
            for p in row.chunks_exact(4) {
                out.extend_from_slice(&p[..3]);
            }
        }
        (C::GrayscaleAlpha, Layout::Luma) => out.extend(row.chunks_exact(2).map(|p| p[0])),
        (C::Rgb | C::Rgba, Layout::Luma) => {
            out.extend(row.chunks_exact(samples).map(|p| luma(p[0], p[1], p[2])))
        }
        // The expand transformation leaves no palette indices.
        (C::Indexed, _) => unreachable!("palette PNGs are expanded by the decoder"),
    }
}

/// JPEG and WebP through `image` (8 bits per channel already), with the decoder's
/// allocations capped at the canvas the header announced (`uw`×`uh`, upright).
fn decode_with_image(
    bytes: &[u8],
    kind: ImageKind,
    (uw, uh): (u32, u32),
    layout: Layout,
) -> Result<(u32, u32, Vec<u8>, Orientation), FetchError> {
    let mut reader = ImageReader::with_format(Cursor::new(bytes), kind.format());
    let mut limits = image::Limits::default();
    limits.max_image_width = Some(uw.max(uh));
    limits.max_image_height = Some(uw.max(uh));
    // Room for the decoded canvas and the decoder's working copies, plus slack.
    limits.max_alloc = Some((uw as u64 * uh as u64).saturating_mul(8) + (64 << 20));
    reader.limits(limits);
    let mut decoder = reader.into_decoder().map_err(decode_error)?;
    let (w, h) = decoder.dimensions();
    let orientation = decoder.orientation().unwrap_or(Orientation::NoTransforms);
    let img = DynamicImage::from_decoder(decoder).map_err(decode_error)?;
    // `into_*` moves the buffer when it already has the wanted layout.
    let px = match layout {
        Layout::Rgb => img.into_rgb8().into_raw(),
        Layout::Luma => img.into_luma8().into_raw(),
    };
    Ok((w, h, px, orientation))
}

/// Downscales 8-bit pixels: Lanczos3 for colour; bilinear for masks, whose hard edges
/// would ring under a longer filter.
fn resize(src: &[u8], (sw, sh): (u32, u32), (dw, dh): (u32, u32), layout: Layout) -> Vec<u8> {
    let (pixel, alg) = match layout {
        Layout::Rgb => (
            PixelType::U8x3,
            ResizeAlg::Convolution(FilterType::Lanczos3),
        ),
        Layout::Luma => (PixelType::U8, ResizeAlg::Convolution(FilterType::Bilinear)),
    };
    let src = ImageRef::new(sw, sh, src, pixel).expect("buffer matches its dimensions");
    let mut dst = Image::new(dw, dh, pixel);
    Resizer::new()
        .resize(&src, &mut dst, &ResizeOptions::new().resize_alg(alg))
        .expect("same pixel type on both sides");
    dst.into_vec()
}

/// Bounds the decodes running at once in this process. Clones share the bound.
///
/// Decodes run on the blocking pool while holding a permit; a caller that stops
/// waiting leaves its decode to finish with the permit, so the bound counts the memory
/// really in use. `in_flight` and `peak` are there to be observed (tests, metrics).
#[derive(Debug, Clone)]
pub struct DecodeGate {
    permits: Arc<Semaphore>,
    limit: usize,
    in_flight: Arc<AtomicUsize>,
    peak: Arc<AtomicUsize>,
}

/// Counts one decode in flight for as long as it lives (also through a panic).
struct InFlight(Arc<AtomicUsize>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl DecodeGate {
    /// At most `limit` (at least 1) decodes at once.
    pub fn new(limit: usize) -> Self {
        let limit = limit.max(1);
        Self {
            permits: Arc::new(Semaphore::new(limit)),
            limit,
            in_flight: Arc::new(AtomicUsize::new(0)),
            peak: Arc::new(AtomicUsize::new(0)),
        }
    }

    pub fn limit(&self) -> usize {
        self.limit
    }

    /// Decodes running now.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::SeqCst)
    }

    /// The most decodes that ever ran at once.
    pub fn peak(&self) -> usize {
        self.peak.load(Ordering::SeqCst)
    }

    /// Runs `work` on the blocking pool once a permit is free.
    pub async fn run<T: Send + 'static>(
        &self,
        work: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, FetchError> {
        let permit = self
            .permits
            .clone()
            .acquire_owned()
            .await
            .expect("the semaphore is never closed");
        let now = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        self.peak.fetch_max(now, Ordering::SeqCst);
        let counted = InFlight(self.in_flight.clone());
        tokio::task::spawn_blocking(move || {
            // Tuple fields drop in order: the count goes down before the permit is
            // handed to the next decode, so the count never shows one too many.
            let _held = (counted, permit);
            work()
        })
        .await
        .map_err(|e| FetchError::Decode(format!("the decoder failed: {e}")))
    }

    /// [`decode_rgb_within`] under the gate.
    pub async fn rgb(
        &self,
        bytes: Bytes,
        max_pixels: u64,
        reduce: Reduce,
    ) -> Result<RgbImage, FetchError> {
        self.run(move || decode_rgb_within(&bytes, max_pixels, reduce))
            .await?
    }

    /// [`decode_luma_within`] under the gate.
    pub async fn luma(
        &self,
        bytes: Bytes,
        max_pixels: u64,
        reduce: Reduce,
    ) -> Result<GrayImage, FetchError> {
        self.run(move || decode_luma_within(&bytes, max_pixels, reduce))
            .await?
    }
}

/// The pixels of one task's images together (`fetch.max_task_pixels`): each fetched
/// image is added from its header, before anything decodes it.
#[derive(Debug, Clone)]
pub struct TaskPixels {
    total: u64,
    limit: u64,
}

impl TaskPixels {
    pub fn new(limit: u64) -> Self {
        Self { total: 0, limit }
    }

    /// Adds a `width`×`height` image; an error (which follows the field name of the
    /// image that went over) when the total passes the limit.
    pub fn add(&mut self, width: u32, height: u32) -> Result<(), FetchError> {
        self.total = self.total.saturating_add(width as u64 * height as u64);
        if self.total > self.limit {
            return Err(FetchError::TaskPixels {
                total: self.total,
                limit: self.limit,
            });
        }
        Ok(())
    }

    pub fn total(&self) -> u64 {
        self.total
    }
}

#[cfg(test)]
mod tests;
