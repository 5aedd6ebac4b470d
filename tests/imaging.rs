//! Imaging: decoding with limits and orientation, fitting to the model's size, masks, and
//! atomic export with metadata. Synthetic images are made in temporary folders; the two real
//! photos are in tests/fixtures/photos (see LICENSES.md there).

use std::fs;
use std::io::{self, Cursor};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use image::codecs::gif::GifEncoder;
use image::codecs::jpeg::JpegEncoder;
use image::{
    DynamicImage, ExtendedColorType, Frame, GrayAlphaImage, GrayImage, ImageBuffer, ImageEncoder,
    ImageFormat, Luma, LumaA, Rgb, RgbImage, Rgba, RgbaImage,
};
use tempfile::TempDir;
use unitune::imaging::{
    DecodeLimits, ExistingFile, ImagingError, SourceFormat, export_image, load_mask, load_photo,
    load_photo_from_bytes, next_free_path, parse_size, read_png_text, resize_rgb, working_size,
};

// ---------------------------------------------------------------------------------------------
// helpers

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/photos")
        .join(name)
}

fn temp_dir() -> TempDir {
    tempfile::tempdir().expect("create a temporary folder")
}

fn limits() -> DecodeLimits {
    DecodeLimits::default()
}

fn encode(image: &DynamicImage, format: ImageFormat) -> Vec<u8> {
    let mut bytes = Cursor::new(Vec::new());
    image
        .write_to(&mut bytes, format)
        .expect("encode test image");
    bytes.into_inner()
}

fn jpeg_bytes(image: &RgbImage) -> Vec<u8> {
    let mut bytes = Vec::new();
    JpegEncoder::new_with_quality(&mut bytes, 95)
        .write_image(
            image.as_raw(),
            image.width(),
            image.height(),
            ExtendedColorType::Rgb8,
        )
        .expect("encode JPEG");
    bytes
}

fn write(dir: &TempDir, name: &str, bytes: &[u8]) -> PathBuf {
    let path = dir.path().join(name);
    fs::write(&path, bytes).expect("write test file");
    path
}

fn names_in(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .expect("list folder")
        .map(|entry| {
            entry
                .expect("folder entry")
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    names.sort();
    names
}

/// Four coloured quadrants: red, green / blue, yellow.
fn quadrants(width: u32, height: u32) -> RgbImage {
    RgbImage::from_fn(width, height, |x, y| {
        match (x < width / 2, y < height / 2) {
            (true, true) => Rgb([255, 0, 0]),
            (false, true) => Rgb([0, 255, 0]),
            (true, false) => Rgb([0, 0, 255]),
            (false, false) => Rgb([255, 255, 0]),
        }
    })
}

fn assert_near(actual: [u8; 3], expected: [u8; 3], tolerance: u8, what: &str) {
    for (a, e) in actual.iter().zip(expected) {
        assert!(
            a.abs_diff(e) <= tolerance,
            "{what}: got {actual:?}, expected {expected:?} within {tolerance}"
        );
    }
}

fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = 0xFFFF_FFFFu32;
    for &byte in bytes {
        crc ^= u32::from(byte);
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

fn png_chunk(kind: &[u8; 4], data: &[u8]) -> Vec<u8> {
    let mut chunk = Vec::new();
    chunk.extend_from_slice(
        &u32::try_from(data.len())
            .expect("small chunk")
            .to_be_bytes(),
    );
    chunk.extend_from_slice(kind);
    chunk.extend_from_slice(data);
    let mut crc_input = kind.to_vec();
    crc_input.extend_from_slice(data);
    chunk.extend_from_slice(&crc32(&crc_input).to_be_bytes());
    chunk
}

/// A well-formed PNG that claims `width` x `height` RGB pixels but carries a few bytes of data:
/// the shape of a decompression bomb, without the bomb.
fn png_claiming(width: u32, height: u32) -> Vec<u8> {
    let mut ihdr = Vec::new();
    ihdr.extend_from_slice(&width.to_be_bytes());
    ihdr.extend_from_slice(&height.to_be_bytes());
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]); // 8-bit, RGB, deflate, no filter, no interlace
    // A zlib stream of one stored, empty block.
    let idat = [
        0x78, 0x01, 0x01, 0x00, 0x00, 0xFF, 0xFF, 0x00, 0x00, 0x00, 0x01,
    ];
    let mut png = vec![0x89, b'P', b'N', b'G', b'\r', b'\n', 0x1A, b'\n'];
    png.extend(png_chunk(b"IHDR", &ihdr));
    png.extend(png_chunk(b"IDAT", &idat));
    png.extend(png_chunk(b"IEND", &[]));
    png
}

/// A big-endian TIFF structure (the body of an Exif block) holding only an Orientation tag.
fn exif_tiff(orientation: u16) -> Vec<u8> {
    let mut tiff = Vec::new();
    tiff.extend_from_slice(b"MM\x00\x2A"); // big-endian TIFF header
    tiff.extend_from_slice(&8u32.to_be_bytes()); // first IFD right after the header
    tiff.extend_from_slice(&1u16.to_be_bytes()); // one entry
    tiff.extend_from_slice(&0x0112u16.to_be_bytes()); // tag: Orientation
    tiff.extend_from_slice(&3u16.to_be_bytes()); // type: SHORT
    tiff.extend_from_slice(&1u32.to_be_bytes()); // count
    tiff.extend_from_slice(&orientation.to_be_bytes());
    tiff.extend_from_slice(&[0, 0]); // value padding
    tiff.extend_from_slice(&0u32.to_be_bytes()); // no next IFD
    tiff
}

/// `jpeg` with an APP1 Exif segment carrying only the given Orientation, inserted after SOI.
fn with_exif_orientation(jpeg: &[u8], orientation: u16) -> Vec<u8> {
    assert_eq!(&jpeg[..2], &[0xFF, 0xD8], "not a JPEG");
    let mut payload = b"Exif\x00\x00".to_vec();
    payload.extend(exif_tiff(orientation));
    let length = u16::try_from(payload.len() + 2).expect("small segment");
    let mut out = vec![0xFF, 0xD8, 0xFF, 0xE1];
    out.extend_from_slice(&length.to_be_bytes());
    out.extend(payload);
    out.extend_from_slice(&jpeg[2..]);
    out
}

/// `png` with an eXIf chunk carrying only the given Orientation, inserted after IHDR.
fn png_with_exif_orientation(png: &[u8], orientation: u16) -> Vec<u8> {
    const AFTER_IHDR: usize = 8 + 25;
    assert_eq!(&png[12..16], b"IHDR", "not a PNG");
    let mut out = png[..AFTER_IHDR].to_vec();
    out.extend(png_chunk(b"eXIf", &exif_tiff(orientation)));
    out.extend_from_slice(&png[AFTER_IHDR..]);
    out
}

fn is_red(pixel: [u8; 3]) -> bool {
    pixel[0] > 200 && pixel[1] < 60 && pixel[2] < 60
}

// ---------------------------------------------------------------------------------------------
// decoding

#[test]
fn real_png_and_jpeg_photos_decode() {
    let cat = load_photo(&fixture("chelsea.png"), &limits()).expect("chelsea.png loads");
    assert_eq!(cat.dimensions(), (451, 300));
    assert_eq!(cat.source_format, SourceFormat::Png);
    assert!(cat.alpha.is_none());

    let rocket = load_photo(&fixture("rocket.jpg"), &limits()).expect("rocket.jpg loads");
    assert_eq!(rocket.dimensions(), (640, 427));
    assert_eq!(rocket.source_format, SourceFormat::Jpeg);
    assert!(rocket.alpha.is_none());
    // Not a flat image: the decoder produced real content.
    let first = rocket.rgb.get_pixel(0, 0).0;
    assert!(rocket.rgb.pixels().any(|p| p.0 != first));
}

#[test]
fn png_jpeg_and_webp_decode_to_the_same_picture() {
    let dir = temp_dir();
    let original = quadrants(32, 16);
    let cases = [
        (
            "q.png",
            encode(&DynamicImage::ImageRgb8(original.clone()), ImageFormat::Png),
            SourceFormat::Png,
            0,
        ),
        ("q.jpg", jpeg_bytes(&original), SourceFormat::Jpeg, 40),
        (
            "q.webp",
            encode(
                &DynamicImage::ImageRgb8(original.clone()),
                ImageFormat::WebP,
            ),
            SourceFormat::WebP,
            0,
        ),
    ];
    for (name, bytes, format, tolerance) in cases {
        let photo = load_photo(&write(&dir, name, &bytes), &limits()).expect(name);
        assert_eq!(photo.source_format, format, "{name}");
        assert_eq!(photo.dimensions(), (32, 16), "{name}");
        assert!(photo.alpha.is_none(), "{name}");
        for (x, y) in [(4, 4), (28, 4), (4, 12), (28, 12)] {
            assert_near(
                photo.rgb.get_pixel(x, y).0,
                original.get_pixel(x, y).0,
                tolerance,
                name,
            );
        }
    }
}

#[test]
fn format_comes_from_content_not_extension() {
    let dir = temp_dir();
    let path = write(&dir, "actually-a-jpeg.png", &jpeg_bytes(&quadrants(16, 16)));
    let photo = load_photo(&path, &limits()).expect("loads despite the extension");
    assert_eq!(photo.source_format, SourceFormat::Jpeg);
}

#[test]
fn gif_gives_its_first_frame() {
    let red = RgbaImage::from_pixel(8, 6, Rgba([255, 0, 0, 255]));
    let blue = RgbaImage::from_pixel(8, 6, Rgba([0, 0, 255, 255]));
    let mut bytes = Vec::new();
    {
        let mut encoder = GifEncoder::new(&mut bytes);
        encoder
            .encode_frames([Frame::new(red), Frame::new(blue)])
            .expect("encode GIF");
    }
    let photo = load_photo_from_bytes(&bytes, "anim.gif", &limits()).expect("GIF loads");
    assert_eq!(photo.source_format, SourceFormat::Gif);
    assert_eq!(photo.dimensions(), (8, 6));
    assert!(
        photo.rgb.pixels().all(|p| p.0 == [255, 0, 0]),
        "first frame is red"
    );
    assert!(photo.alpha.is_none(), "an opaque GIF has no alpha to keep");
}

#[test]
fn exif_orientation_6_rotates_clockwise() {
    // Stored 32x16 with a red top-left 8x8 block; Orientation 6 means "rotate 90 degrees
    // clockwise to display", which takes the stored top-left corner to the top-right.
    let stored = RgbImage::from_fn(32, 16, |x, y| {
        if x < 8 && y < 8 {
            Rgb([255, 0, 0])
        } else {
            Rgb([255, 255, 255])
        }
    });
    let bytes = with_exif_orientation(&jpeg_bytes(&stored), 6);
    let dir = temp_dir();
    let photo = load_photo(&write(&dir, "rotated.jpg", &bytes), &limits()).expect("loads");
    assert_eq!(photo.dimensions(), (16, 32), "width and height swap");
    assert!(
        is_red(photo.rgb.get_pixel(12, 3).0),
        "marked corner is now top-right"
    );
    assert!(
        !is_red(photo.rgb.get_pixel(3, 3).0),
        "top-left is no longer marked"
    );
    assert!(
        !is_red(photo.rgb.get_pixel(12, 28).0),
        "bottom-right is not marked"
    );

    // Without the segment the same pixels stay where they were.
    let plain = load_photo_from_bytes(&jpeg_bytes(&stored), "plain.jpg", &limits()).expect("loads");
    assert_eq!(plain.dimensions(), (32, 16));
    assert!(is_red(plain.rgb.get_pixel(3, 3).0));
}

#[test]
fn png_exif_orientation_is_applied_too() {
    // Orientation 8: rotate 90 degrees counter-clockwise; stored top-left goes to bottom-left.
    let stored = RgbImage::from_fn(6, 4, |x, y| {
        if (x, y) == (0, 0) {
            Rgb([255, 0, 0])
        } else {
            Rgb([255, 255, 255])
        }
    });
    let png = encode(&DynamicImage::ImageRgb8(stored), ImageFormat::Png);
    let bytes = png_with_exif_orientation(&png, 8);
    let photo = load_photo_from_bytes(&bytes, "rotated.png", &limits()).expect("loads");
    assert_eq!(photo.dimensions(), (4, 6));
    assert_eq!(photo.rgb.get_pixel(0, 5).0, [255, 0, 0]);
    assert_eq!(photo.rgb.get_pixel(0, 0).0, [255, 255, 255]);
}

#[test]
fn grayscale_becomes_rgb() {
    let gray = GrayImage::from_fn(4, 2, |x, _| Luma([u8::try_from(x * 60).expect("small")]));
    let bytes = encode(&DynamicImage::ImageLuma8(gray), ImageFormat::Png);
    let photo = load_photo_from_bytes(&bytes, "gray.png", &limits()).expect("loads");
    assert_eq!(photo.rgb.get_pixel(2, 1).0, [120, 120, 120]);
    assert!(photo.alpha.is_none());
}

#[test]
fn sixteen_bit_is_rounded_to_eight() {
    let deep: ImageBuffer<Rgb<u16>, Vec<u16>> =
        ImageBuffer::from_pixel(3, 3, Rgb([0x8080, 0xFFFF, 0x0101]));
    let bytes = encode(&DynamicImage::ImageRgb16(deep), ImageFormat::Png);
    let photo = load_photo_from_bytes(&bytes, "deep.png", &limits()).expect("loads");
    assert_eq!(photo.rgb.get_pixel(1, 1).0, [0x80, 0xFF, 0x01]);
}

#[test]
fn alpha_is_composited_over_white_and_kept() {
    let mut rgba = RgbaImage::from_pixel(4, 4, Rgba([0, 0, 0, 255]));
    rgba.put_pixel(0, 0, Rgba([12, 34, 56, 0])); // fully transparent, colour undefined
    rgba.put_pixel(1, 0, Rgba([0, 0, 0, 128])); // half-transparent black
    let bytes = encode(&DynamicImage::ImageRgba8(rgba), ImageFormat::Png);
    let photo = load_photo_from_bytes(&bytes, "alpha.png", &limits()).expect("loads");
    assert_eq!(
        photo.rgb.get_pixel(0, 0).0,
        [255, 255, 255],
        "transparent is white"
    );
    assert_eq!(
        photo.rgb.get_pixel(1, 0).0,
        [127, 127, 127],
        "half black over white"
    );
    assert_eq!(photo.rgb.get_pixel(2, 2).0, [0, 0, 0], "opaque untouched");
    let alpha = photo.alpha.expect("alpha kept");
    assert_eq!(
        (
            alpha.get_pixel(0, 0).0,
            alpha.get_pixel(1, 0).0,
            alpha.get_pixel(2, 2).0
        ),
        ([0], [128], [255])
    );

    // Grey + alpha, 16-bit + alpha.
    let gray_alpha = GrayAlphaImage::from_pixel(2, 2, LumaA([0, 0]));
    let bytes = encode(&DynamicImage::ImageLumaA8(gray_alpha), ImageFormat::Png);
    let photo = load_photo_from_bytes(&bytes, "ga.png", &limits()).expect("loads");
    assert_eq!(photo.rgb.get_pixel(1, 1).0, [255, 255, 255]);
    assert_eq!(photo.alpha.expect("alpha kept").get_pixel(1, 1).0, [0]);

    let deep: ImageBuffer<Rgba<u16>, Vec<u16>> =
        ImageBuffer::from_pixel(2, 2, Rgba([0xFFFF, 0, 0, 0x8080]));
    let bytes = encode(&DynamicImage::ImageRgba16(deep), ImageFormat::Png);
    let photo = load_photo_from_bytes(&bytes, "deep-alpha.png", &limits()).expect("loads");
    assert_eq!(photo.rgb.get_pixel(0, 0).0, [255, 127, 127]);
    assert_eq!(photo.alpha.expect("alpha kept").get_pixel(0, 0).0, [128]);
}

#[test]
fn corrupt_png_is_refused_with_its_name() {
    let mut bytes = fs::read(fixture("chelsea.png")).expect("fixture");
    let middle = bytes.len() / 2;
    for byte in &mut bytes[middle..middle + 64] {
        *byte ^= 0x5A;
    }
    let err = load_photo_from_bytes(&bytes, "broken-cat.png", &limits()).expect_err("corrupt");
    assert!(matches!(err, ImagingError::Corrupt { .. }), "{err:?}");
    assert!(err.is_invalid_input());
    assert!(err.to_string().contains("broken-cat.png"), "{err}");
}

#[test]
fn truncated_png_is_refused() {
    let bytes = fs::read(fixture("chelsea.png")).expect("fixture");
    let dir = temp_dir();
    let path = write(&dir, "half.png", &bytes[..bytes.len() / 2]);
    let err = load_photo(&path, &limits()).expect_err("truncated");
    assert!(matches!(err, ImagingError::Truncated { .. }), "{err:?}");
    assert!(err.is_invalid_input());
    assert!(err.to_string().contains("half.png"));
}

#[test]
fn truncated_jpeg_is_refused() {
    // The JPEG decoder fills a cut-off scan with grey instead of failing; the loader must not
    // hand such half a photo on.
    let bytes = fs::read(fixture("rocket.jpg")).expect("fixture");
    let dir = temp_dir();
    for cut in [200, bytes.len() / 2, bytes.len() - 2] {
        let path = write(&dir, "cut.jpg", &bytes[..cut]);
        let err = load_photo(&path, &limits()).expect_err("truncated");
        assert!(
            matches!(err, ImagingError::Truncated { .. }),
            "cut at {cut}: {err:?}"
        );
        assert!(err.is_invalid_input());
        let err =
            load_photo_from_bytes(&bytes[..cut], "cut.jpg", &limits()).expect_err("truncated");
        assert!(
            matches!(err, ImagingError::Truncated { .. }),
            "cut at {cut}: {err:?}"
        );
    }
    // Data appended after the end marker (as some cameras write) is no reason to refuse.
    let mut trailing = bytes.clone();
    trailing.extend_from_slice(b"maker notes after the image");
    let photo = load_photo_from_bytes(&trailing, "trailing.jpg", &limits()).expect("loads");
    assert_eq!(photo.dimensions(), (640, 427));
}

#[test]
fn non_image_and_unsupported_formats_are_refused() {
    let err = load_photo_from_bytes(b"just some text, not pixels\n", "notes.png", &limits())
        .expect_err("not an image");
    assert!(matches!(err, ImagingError::NotAnImage { .. }), "{err:?}");
    let text = err.to_string();
    assert!(
        text.contains("notes.png") && text.contains("PNG, JPEG, WebP or GIF"),
        "{text}"
    );
    assert!(err.is_invalid_input());

    let err = load_photo_from_bytes(b"", "empty.jpg", &limits()).expect_err("empty file");
    assert!(matches!(err, ImagingError::NotAnImage { .. }), "{err:?}");

    // A BMP header: recognised, but this build cannot decode it.
    let mut bmp = b"BM".to_vec();
    bmp.extend_from_slice(&[0; 60]);
    let err = load_photo_from_bytes(&bmp, "old.bmp", &limits()).expect_err("BMP");
    match &err {
        ImagingError::UnsupportedFormat { format, .. } => assert_eq!(format, "BMP"),
        other => panic!("expected UnsupportedFormat, got {other:?}"),
    }
    assert!(
        err.to_string()
            .contains("convert it to PNG, JPEG, WebP or GIF")
    );
}

#[test]
fn missing_file_and_folder_are_refused() {
    let dir = temp_dir();
    let missing = dir.path().join("nope.jpg");
    let err = load_photo(&missing, &limits()).expect_err("missing");
    assert!(matches!(err, ImagingError::NotFound { .. }), "{err:?}");
    assert!(err.is_invalid_input());
    assert!(err.to_string().contains("nope.jpg"));

    let err = load_photo(dir.path(), &limits()).expect_err("a folder");
    assert!(matches!(err, ImagingError::IsFolder { .. }), "{err:?}");
}

#[test]
fn decompression_bomb_is_refused_before_allocating() {
    let bytes = png_claiming(100_000, 100_000);
    assert!(bytes.len() < 100, "the bomb file itself is tiny");
    let started = Instant::now();
    let err = load_photo_from_bytes(&bytes, "bomb.png", &limits()).expect_err("bomb");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "refused quickly"
    );
    match &err {
        ImagingError::TooLarge {
            width,
            height,
            max_width,
            max_height,
            ..
        } => {
            assert_eq!(
                (*width, *height, *max_width, *max_height),
                (100_000, 100_000, 16384, 16384)
            );
        }
        other => panic!("expected TooLarge, got {other:?}"),
    }
    let text = err.to_string();
    assert!(
        text.contains("100000x100000") && text.contains("16384x16384"),
        "{text}"
    );
    assert!(err.is_invalid_input());
}

#[test]
fn memory_limit_is_checked_from_the_header() {
    // 10000 x 10000 RGB is within the side limits but needs 286 MiB.
    let bytes = png_claiming(10_000, 10_000);
    let tight = DecodeLimits {
        max_alloc_bytes: 64 << 20,
        ..DecodeLimits::default()
    };
    let started = Instant::now();
    let err = load_photo_from_bytes(&bytes, "wide.png", &tight).expect_err("over memory");
    assert!(started.elapsed() < Duration::from_secs(2));
    match &err {
        ImagingError::TooMuchMemory {
            width,
            height,
            needed_bytes,
            limit_bytes,
            ..
        } => {
            assert_eq!((*width, *height), (10_000, 10_000));
            assert_eq!(*needed_bytes, 300_000_000);
            assert_eq!(*limit_bytes, 64 << 20);
        }
        other => panic!("expected TooMuchMemory, got {other:?}"),
    }
    assert!(err.to_string().contains("287 MiB"), "{err}");
}

// ---------------------------------------------------------------------------------------------
// working size and resizing

#[test]
fn working_size_keeps_aspect_in_multiples_of_64() {
    assert_eq!(
        working_size(4000, 3000, 512, None).expect("fits"),
        (576, 448)
    );
    assert_eq!(
        working_size(3000, 4000, 512, None).expect("fits"),
        (448, 576)
    );
    assert_eq!(
        working_size(1000, 1000, 512, None).expect("fits"),
        (512, 512)
    );
    assert_eq!(
        working_size(1000, 1000, 768, None).expect("fits"),
        (768, 768)
    );
    for (w, h, side) in [
        (451, 300, 512),
        (640, 427, 512),
        (6000, 4000, 768),
        (37, 500, 512),
        (1920, 1080, 1024),
    ] {
        let (ww, wh) = working_size(w, h, side, None).expect("fits");
        assert!(
            ww % 64 == 0 && wh % 64 == 0 && ww >= 64 && wh >= 64,
            "{w}x{h} -> {ww}x{wh}"
        );
        let area = f64::from(ww) * f64::from(wh) / f64::from(side * side);
        assert!(
            (0.75..=1.3).contains(&area),
            "{w}x{h} -> {ww}x{wh}: area ratio {area}"
        );
        // Rounding each side to 64 moves the aspect by at most about one step on the short side.
        let aspect = (f64::from(ww) / f64::from(wh)) / (f64::from(w) / f64::from(h));
        let slack = 1.0 + 40.0 / f64::from(ww.min(wh));
        assert!(
            (1.0 / slack..=slack).contains(&aspect),
            "{w}x{h} -> {ww}x{wh}: aspect off by {aspect}"
        );
        assert_eq!(ww >= wh, w >= h, "orientation kept for {w}x{h}");
    }
}

#[test]
fn requested_size_overrides_and_is_checked() {
    assert_eq!(
        working_size(4000, 3000, 512, Some((640, 384))).expect("valid"),
        (640, 384)
    );
    let err = working_size(4000, 3000, 512, Some((500, 300))).expect_err("not multiples of 64");
    match &err {
        ImagingError::SizeNotMultipleOf64 {
            suggested_width,
            suggested_height,
            ..
        } => {
            assert_eq!((*suggested_width, *suggested_height), (512, 320));
        }
        other => panic!("expected SizeNotMultipleOf64, got {other:?}"),
    }
    assert!(err.to_string().contains("try 512x320"), "{err}");
    assert!(err.is_invalid_input());
    let err = working_size(4000, 3000, 512, Some((0, 512))).expect_err("zero side");
    assert!(err.to_string().contains("try 64x512"), "{err}");

    assert_eq!(parse_size("512x384").expect("valid"), (512, 384));
    let err = parse_size("512 by 384").expect_err("invalid");
    assert!(matches!(err, ImagingError::InvalidSizeText { .. }));
    assert!(err.to_string().contains("WIDTHxHEIGHT"));

    let err = working_size(0, 300, 512, None).expect_err("no pixels");
    assert!(matches!(err, ImagingError::EmptyImage { .. }), "{err:?}");
}

#[test]
fn resize_to_working_size_and_back_keeps_the_picture() {
    let cat = load_photo(&fixture("chelsea.png"), &limits()).expect("fixture");
    let (w, h) = working_size(451, 300, 512, None).expect("fits");
    let small = resize_rgb(&cat.rgb, w, h);
    assert_eq!(small.dimensions(), (w, h));
    let back = resize_rgb(&small, 451, 300);
    assert_eq!(back.dimensions(), (451, 300));
    let total: u64 = back
        .as_raw()
        .iter()
        .zip(cat.rgb.as_raw())
        .map(|(a, b)| u64::from(a.abs_diff(*b)))
        .sum();
    let mean = total as f64 / back.as_raw().len() as f64;
    assert!(
        mean < 4.0,
        "mean absolute difference after a round trip: {mean}"
    );

    // Same size: an exact copy.
    assert_eq!(resize_rgb(&cat.rgb, 451, 300), cat.rgb);
}

// ---------------------------------------------------------------------------------------------
// masks

#[test]
fn mask_is_luminance_resized_to_the_photo() {
    let dir = temp_dir();
    // Left half white (may change), right half black.
    let mask = GrayImage::from_fn(40, 20, |x, _| Luma([if x < 20 { 255 } else { 0 }]));
    let path = write(
        &dir,
        "mask.png",
        &encode(&DynamicImage::ImageLuma8(mask), ImageFormat::Png),
    );
    let loaded = load_mask(&path, &limits(), 80, 40).expect("mask loads");
    assert_eq!(loaded.dimensions(), (80, 40));
    assert_eq!(loaded.get_pixel(5, 20).0, [255]);
    assert_eq!(loaded.get_pixel(75, 20).0, [0]);

    // Same size: no resampling.
    let same = load_mask(&path, &limits(), 40, 20).expect("mask loads");
    assert_eq!(same.get_pixel(19, 0).0, [255]);
    assert_eq!(same.get_pixel(20, 0).0, [0]);

    // A colour mask counts by luminance: pure red is dark grey, white is white.
    let colour = RgbImage::from_fn(4, 4, |x, _| {
        if x < 2 {
            Rgb([255, 0, 0])
        } else {
            Rgb([255, 255, 255])
        }
    });
    let path = write(
        &dir,
        "red.png",
        &encode(&DynamicImage::ImageRgb8(colour), ImageFormat::Png),
    );
    let loaded = load_mask(&path, &limits(), 4, 4).expect("mask loads");
    assert!(
        (40..=80).contains(&loaded.get_pixel(0, 0).0[0]),
        "{:?}",
        loaded.get_pixel(0, 0)
    );
    assert_eq!(loaded.get_pixel(3, 0).0, [255]);
}

#[test]
fn black_mask_is_refused() {
    let dir = temp_dir();
    let black = GrayImage::from_pixel(16, 16, Luma([3]));
    let path = write(
        &dir,
        "black.png",
        &encode(&DynamicImage::ImageLuma8(black), ImageFormat::Png),
    );
    let err = load_mask(&path, &limits(), 16, 16).expect_err("nothing to change");
    assert!(matches!(err, ImagingError::MaskEmpty { .. }), "{err:?}");
    assert!(err.is_invalid_input());
    assert!(err.to_string().contains("black.png"));

    let err = load_mask(&dir.path().join("none.png"), &limits(), 16, 16).expect_err("missing");
    assert!(matches!(err, ImagingError::NotFound { .. }), "{err:?}");
}

// ---------------------------------------------------------------------------------------------
// export

fn recipe_text() -> Vec<(String, String)> {
    vec![
        (
            "unitune".to_string(),
            r#"{"prompt":"a photo of a 猫 in the snow","seed":42}"#.to_string(),
        ),
        (
            "parameters".to_string(),
            "a café at night\nSteps: 50, Sampler: DDIM, Seed: 42".to_string(),
        ),
    ]
}

#[test]
fn png_export_keeps_pixels_alpha_and_text() {
    let dir = temp_dir();
    let rgb = quadrants(24, 12);
    let alpha = GrayImage::from_fn(24, 12, |x, _| Luma([u8::try_from(x * 10).expect("small")]));
    let path = dir.path().join("result.png");
    export_image(
        &path,
        &rgb,
        Some(&alpha),
        &recipe_text(),
        ExistingFile::Refuse,
    )
    .expect("export");

    let mut text = read_png_text(&path).expect("text reads back");
    text.sort();
    let mut expected = recipe_text();
    expected.sort();
    assert_eq!(text, expected);

    // Read the raw RGBA back: the alpha is attached and the colour untouched.
    let raw = image::open(&path).expect("decodes").into_rgba8();
    assert_eq!(raw.dimensions(), (24, 12));
    for (x, y) in [(0, 0), (5, 3), (23, 11), (13, 7)] {
        let [r, g, b, a] = raw.get_pixel(x, y).0;
        assert_eq!([r, g, b], rgb.get_pixel(x, y).0);
        assert_eq!(a, alpha.get_pixel(x, y).0[0]);
    }
    assert_eq!(
        names_in(dir.path()),
        ["result.png"],
        "no temporary file left"
    );

    // Without alpha: a plain RGB PNG.
    let path = dir.path().join("opaque.png");
    export_image(&path, &rgb, None, &[], ExistingFile::Refuse).expect("export");
    let photo = load_photo(&path, &limits()).expect("loads");
    assert_eq!(photo.rgb, rgb);
    assert!(photo.alpha.is_none());
    assert!(read_png_text(&path).expect("reads").is_empty());
}

#[test]
fn jpeg_and_webp_export() {
    let dir = temp_dir();
    let rgb = quadrants(32, 16);

    let jpeg = dir.path().join("out.JPG");
    export_image(&jpeg, &rgb, None, &recipe_text(), ExistingFile::Refuse).expect("JPEG export");
    let photo = load_photo(&jpeg, &limits()).expect("JPEG loads");
    assert_eq!(photo.source_format, SourceFormat::Jpeg);
    assert_eq!(photo.dimensions(), (32, 16));
    assert_near(photo.rgb.get_pixel(4, 4).0, [255, 0, 0], 40, "JPEG red");

    let also_jpeg = dir.path().join("out.jpeg");
    export_image(&also_jpeg, &rgb, None, &[], ExistingFile::Refuse).expect("JPEG export");
    assert_eq!(
        load_photo(&also_jpeg, &limits())
            .expect("loads")
            .source_format,
        SourceFormat::Jpeg
    );

    let webp = dir.path().join("out.webp");
    let alpha = GrayImage::from_fn(32, 16, |x, _| Luma([if x < 16 { 255 } else { 100 }]));
    export_image(&webp, &rgb, Some(&alpha), &[], ExistingFile::Refuse).expect("WebP export");
    let raw = image::open(&webp).expect("decodes").into_rgba8();
    assert_eq!(raw.get_pixel(4, 4).0, [255, 0, 0, 255], "lossless");
    assert_eq!(
        raw.get_pixel(28, 12).0,
        [255, 255, 0, 100],
        "lossless with alpha"
    );
    let photo = load_photo(&webp, &limits()).expect("WebP loads");
    assert_eq!(photo.source_format, SourceFormat::WebP);

    let err = read_png_text(&jpeg).expect_err("not a PNG");
    assert!(matches!(err, ImagingError::NotPng { .. }), "{err:?}");
    assert_eq!(names_in(dir.path()), ["out.JPG", "out.jpeg", "out.webp"]);
}

#[test]
fn refuse_leaves_existing_file_byte_identical() {
    let dir = temp_dir();
    let path = write(&dir, "keep.png", b"precious bytes, not even a PNG");
    let err =
        export_image(&path, &quadrants(8, 8), None, &[], ExistingFile::Refuse).expect_err("exists");
    assert!(matches!(err, ImagingError::TargetExists { .. }), "{err:?}");
    assert!(err.is_invalid_input());
    assert!(err.to_string().contains("keep.png"));
    assert_eq!(
        fs::read(&path).expect("read"),
        b"precious bytes, not even a PNG"
    );
    assert_eq!(names_in(dir.path()), ["keep.png"]);
}

#[test]
fn overwrite_replaces_the_file() {
    let dir = temp_dir();
    let path = write(&dir, "replace.png", b"old");
    let rgb = quadrants(8, 8);
    export_image(&path, &rgb, None, &[], ExistingFile::Overwrite).expect("overwrite");
    assert_eq!(
        load_photo(&path, &limits()).expect("new file decodes").rgb,
        rgb
    );
    assert_eq!(names_in(dir.path()), ["replace.png"]);
}

#[test]
fn failed_export_leaves_nothing_behind() {
    let dir = temp_dir();
    // JPEG cannot be wider than 65535 pixels: the encoder fails after the temporary file exists.
    let too_wide = RgbImage::new(65_536, 1);
    let path = dir.path().join("wide.jpg");
    let err =
        export_image(&path, &too_wide, None, &[], ExistingFile::Overwrite).expect_err("too wide");
    assert!(matches!(err, ImagingError::EncodeFailed { .. }), "{err:?}");
    assert!(!err.is_invalid_input());
    assert!(
        names_in(dir.path()).is_empty(),
        "left behind: {:?}",
        names_in(dir.path())
    );

    // The same failure over an existing file leaves that file untouched.
    let existing = write(&dir, "wide.jpg", b"the old result");
    export_image(&existing, &too_wide, None, &[], ExistingFile::Overwrite).expect_err("too wide");
    assert_eq!(fs::read(&existing).expect("read"), b"the old result");
    assert_eq!(names_in(dir.path()), ["wide.jpg"]);
}

#[test]
fn unknown_extension_and_missing_folder_are_refused() {
    let dir = temp_dir();
    let rgb = quadrants(8, 8);
    for name in ["out.bmp", "out", "out.png.txt"] {
        let err = export_image(
            &dir.path().join(name),
            &rgb,
            None,
            &[],
            ExistingFile::Refuse,
        )
        .expect_err("unknown type");
        assert!(
            matches!(err, ImagingError::UnsupportedExportExtension { .. }),
            "{name}: {err:?}"
        );
        assert!(err.is_invalid_input());
        assert!(err.to_string().contains(".png, .jpg, .jpeg or .webp"));
    }

    let missing = dir.path().join("no-such-folder");
    let err = export_image(
        &missing.join("out.png"),
        &rgb,
        None,
        &[],
        ExistingFile::Refuse,
    )
    .expect_err("folder missing");
    match &err {
        ImagingError::FolderMissing { folder, .. } => assert_eq!(folder, &missing),
        other => panic!("expected FolderMissing, got {other:?}"),
    }
    assert!(names_in(dir.path()).is_empty());
}

#[test]
fn bad_alpha_or_keyword_is_refused_before_writing() {
    let dir = temp_dir();
    let rgb = quadrants(8, 8);
    let small_alpha = GrayImage::new(4, 4);
    let err = export_image(
        &dir.path().join("a.png"),
        &rgb,
        Some(&small_alpha),
        &[],
        ExistingFile::Refuse,
    )
    .expect_err("mismatch");
    assert!(
        matches!(err, ImagingError::AlphaSizeMismatch { .. }),
        "{err:?}"
    );
    let text = vec![(" bad key".to_string(), "value".to_string())];
    let err = export_image(
        &dir.path().join("a.png"),
        &rgb,
        None,
        &text,
        ExistingFile::Refuse,
    )
    .expect_err("bad keyword");
    assert!(
        matches!(err, ImagingError::InvalidTextKey { .. }),
        "{err:?}"
    );
    assert!(names_in(dir.path()).is_empty());
}

#[cfg(target_os = "linux")]
#[test]
fn read_only_destination_is_reported() {
    // Tests run as root, for whom chmod does not stop writes; sysfs refuses new files even to
    // root. Skip where it does not.
    let folder = Path::new("/sys");
    let probe = folder.join(".unitune-write-probe");
    match fs::File::create_new(&probe) {
        Ok(_) => {
            let _ = fs::remove_file(&probe);
            eprintln!(
                "note: {} is writable here; read-only export not tested",
                folder.display()
            );
            return;
        }
        Err(error)
            if matches!(
                error.kind(),
                io::ErrorKind::PermissionDenied | io::ErrorKind::ReadOnlyFilesystem
            ) => {}
        Err(error) => {
            eprintln!(
                "note: probing {} failed unexpectedly ({error}); read-only export not tested",
                folder.display()
            );
            return;
        }
    }
    let err = export_image(
        &folder.join("out.png"),
        &quadrants(8, 8),
        None,
        &[],
        ExistingFile::Refuse,
    )
    .expect_err("read-only");
    assert!(matches!(err, ImagingError::ReadOnly { .. }), "{err:?}");
    assert!(!err.is_invalid_input());
    assert!(err.to_string().contains("read-only"), "{err}");
}

#[test]
fn disk_full_maps_to_its_own_error() {
    let path = Path::new("results/out.png");
    for error in [
        io::Error::from(io::ErrorKind::StorageFull),
        io::Error::from_raw_os_error(28),
    ] {
        let mapped = ImagingError::from_export_io(path, error);
        assert!(
            matches!(mapped, ImagingError::DiskFull { .. }),
            "{mapped:?}"
        );
        assert!(
            !mapped.is_invalid_input(),
            "a full disk is not the user's input"
        );
        let text = mapped.to_string();
        assert!(
            text.contains("results/out.png") && text.contains("disk is full"),
            "{text}"
        );
    }
    let mapped = ImagingError::from_export_io(path, io::Error::from(io::ErrorKind::AlreadyExists));
    assert!(matches!(mapped, ImagingError::TargetExists { .. }));
    let mapped = ImagingError::from_export_io(path, io::Error::other("cable unplugged"));
    assert!(matches!(mapped, ImagingError::WriteFailed { .. }));
    assert!(!mapped.is_invalid_input());
}

#[cfg(unix)]
#[test]
fn exported_file_has_ordinary_permissions() {
    use std::os::unix::fs::PermissionsExt;
    let dir = temp_dir();
    let plain = write(&dir, "plain.txt", b"x");
    let exported = dir.path().join("out.png");
    export_image(&exported, &quadrants(8, 8), None, &[], ExistingFile::Refuse).expect("export");
    let mode = |p: &Path| fs::metadata(p).expect("metadata").permissions().mode() & 0o777;
    assert_eq!(
        mode(&exported),
        mode(&plain),
        "same as any new file (0666 less the umask)"
    );

    // Overwriting keeps the old file's permissions.
    fs::set_permissions(&exported, fs::Permissions::from_mode(0o640)).expect("chmod");
    export_image(
        &exported,
        &quadrants(8, 8),
        None,
        &[],
        ExistingFile::Overwrite,
    )
    .expect("export");
    assert_eq!(mode(&exported), 0o640);
}

#[test]
fn next_free_path_counts_up() {
    let dir = temp_dir();
    let base = dir.path().join("photo-edit.png");
    assert_eq!(next_free_path(&base), base);
    fs::write(&base, b"x").expect("write");
    assert_eq!(next_free_path(&base), dir.path().join("photo-edit-1.png"));
    fs::write(dir.path().join("photo-edit-1.png"), b"x").expect("write");
    fs::write(dir.path().join("photo-edit-2.png"), b"x").expect("write");
    assert_eq!(next_free_path(&base), dir.path().join("photo-edit-3.png"));

    let bare = dir.path().join("noext");
    fs::write(&bare, b"x").expect("write");
    assert_eq!(next_free_path(&bare), dir.path().join("noext-1"));
}
