//! `unitune tune`, `edit` (fine-tuned) and `grid` end to end on the tiny fixture model:
//! the snapshot cache, masks, the recipe in the PNG, and Ctrl-C.
//!
//! Every run uses its own cache folder (XDG_CACHE_HOME) and 1-2 cross-kv fine-tuning steps,
//! so the whole file stays quick on a CPU.

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{copy_dir, fixtures, model_dir, unitune};
use unitune::imaging::read_png_text;

fn model() -> String {
    model_dir("sd15-tiny").display().to_string()
}

fn photo() -> String {
    fixtures().join("photos/chelsea.png").display().to_string()
}

const TUNE: [&str; 6] = [
    "--train",
    "cross-kv",
    "--snapshots",
    "1,2",
    "--device",
    "cpu",
];

fn cache_files(home: &Path) -> Vec<std::path::PathBuf> {
    let dir = home.join("cache/unitune/snapshots");
    match std::fs::read_dir(dir) {
        Ok(entries) => entries.map(|e| e.unwrap().path()).collect(),
        Err(_) => Vec::new(),
    }
}

#[test]
fn a_second_edit_of_the_same_photo_reuses_the_snapshots_and_a_damaged_entry_is_rebuilt() {
    let home = tempfile::tempdir().unwrap();
    let h = home.path();
    let (m, p) = (model(), photo());
    let edit = |out: &str, extra: &[&str]| {
        let mut args = vec![
            "edit",
            &p,
            "--prompt",
            "a cat wearing sunglasses",
            "--model",
            &m,
            "--tune-steps",
            "2",
            "--t0",
            "0.9",
            "--seed",
            "3",
            "--sampling-steps",
            "2",
            "--out",
            out,
        ];
        args.extend_from_slice(&TUNE);
        args.extend_from_slice(extra);
        unitune(&args, h)
    };

    let first = edit("a.png", &[]);
    assert_eq!(first.code, 0, "{}", first.stderr);
    assert!(
        first.stderr.contains("snapshots saved to"),
        "{}",
        first.stderr
    );
    assert_eq!(cache_files(h).len(), 1);

    let second = edit("b.png", &[]);
    assert_eq!(second.code, 0, "{}", second.stderr);
    assert!(
        second.stderr.contains("using cached snapshots"),
        "{}",
        second.stderr
    );
    assert!(
        !second.stderr.contains("snapshot kept"),
        "a cached edit must not train: {}",
        second.stderr
    );
    let a = image::open(h.join("a.png")).unwrap().to_rgb8();
    let b = image::open(h.join("b.png")).unwrap().to_rgb8();
    assert_eq!(
        a.as_raw(),
        b.as_raw(),
        "cached snapshots give the same edit"
    );

    // The recipe in the PNG names the fine-tuning.
    let recipe = common::png_recipe(&h.join("a.png"));
    assert_eq!(recipe["tune_steps"], 2);
    assert_eq!(recipe["tuning"]["train"], "cross-kv");
    assert_eq!(
        recipe["tuning"]["snapshot_steps"],
        serde_json::json!([1, 2])
    );
    assert_eq!(recipe["model_prompt"], "beikkpic a cat wearing sunglasses");
    assert_eq!(recipe["model_family"], "SD 1.x");

    // A damaged entry is never trusted: it is reported and rebuilt.
    let entry = &cache_files(h)[0];
    std::fs::write(entry.join("2.safetensors"), b"garbage").unwrap();
    let third = edit("c.png", &[]);
    assert_eq!(third.code, 0, "{}", third.stderr);
    assert!(
        third.stderr.contains("damaged cache entry"),
        "{}",
        third.stderr
    );
    assert!(
        third.stderr.contains("snapshots saved to"),
        "{}",
        third.stderr
    );
    let c = image::open(h.join("c.png")).unwrap().to_rgb8();
    assert_eq!(
        a.as_raw(),
        c.as_raw(),
        "retraining with the same recipe is reproducible"
    );

    // --no-cache retrains and writes nothing.
    let before = std::fs::metadata(entry).unwrap().modified().unwrap();
    let fourth = edit("d.png", &["--no-cache"]);
    assert_eq!(fourth.code, 0, "{}", fourth.stderr);
    assert!(!fourth.stderr.contains("using cached"), "{}", fourth.stderr);
    assert_eq!(
        std::fs::metadata(entry).unwrap().modified().unwrap(),
        before
    );
}

#[test]
fn masked_edits_keep_every_pixel_outside_the_feathered_border() {
    let home = tempfile::tempdir().unwrap();
    let h = home.path();
    // Mask of another size than the photo (451x300): resized.
    let mask = image::GrayImage::from_fn(100, 100, |x, y| {
        image::Luma([if (30..60).contains(&x) && (30..70).contains(&y) {
            255
        } else {
            0
        }])
    });
    mask.save(h.join("mask.png")).unwrap();
    let (m, p) = (model(), photo());
    let mut args = vec![
        "edit",
        &p,
        "--prompt",
        "sunglasses",
        "--model",
        &m,
        "--tune-steps",
        "1",
        "--t0",
        "1.0",
        "--seed",
        "1",
        "--sampling-steps",
        "2",
        "--mask",
        "mask.png",
        "--out",
        "masked.png",
    ];
    args.extend_from_slice(&TUNE);
    let run = unitune(&args, h);
    assert_eq!(run.code, 0, "{}", run.stderr);
    let original = image::open(fixtures().join("photos/chelsea.png"))
        .unwrap()
        .to_rgb8();
    let edited = image::open(h.join("masked.png")).unwrap().to_rgb8();
    let big_mask = unitune::imaging::resize_gray(&mask, 451, 300);
    let radius = unitune::imaging::default_feather_radius(451, 300) as i64;
    let (mut outside, mut changed_inside) = (0, 0);
    for (x, y, px) in edited.enumerate_pixels() {
        // Distance to the nearest mask pixel, brute force over the mask's bounding box.
        let near = (0..451i64).any(|mx| {
            (mx - x as i64).abs() <= radius + 1
                && (0..300i64).any(|my| {
                    (my - y as i64).abs() <= radius + 1
                        && big_mask.get_pixel(mx as u32, my as u32)[0] > 0
                })
        });
        if !near {
            assert_eq!(
                px,
                original.get_pixel(x, y),
                "pixel ({x}, {y}) outside the mask changed"
            );
            outside += 1;
        } else if big_mask.get_pixel(x, y)[0] == 255 && px != original.get_pixel(x, y) {
            changed_inside += 1;
        }
    }
    assert!(
        outside > 100_000,
        "most of the photo is outside the mask: {outside}"
    );
    assert!(
        changed_inside > 1000,
        "the masked area was edited: {changed_inside}"
    );
}

#[test]
fn grid_has_a_column_per_snapshot_and_a_row_per_t0() {
    let home = tempfile::tempdir().unwrap();
    let h = home.path();
    let (m, p) = (model(), photo());
    let mut args = vec![
        "grid",
        &p,
        "--prompt",
        "pixel art",
        "--model",
        &m,
        "--t0-values",
        "1.0,0.8",
        "--seed",
        "2",
        "--sampling-steps",
        "1",
        "--out",
        "grid.png",
    ];
    args.extend_from_slice(&TUNE);
    let run = unitune(&args, h);
    assert_eq!(run.code, 0, "{}", run.stderr);
    let grid = image::open(h.join("grid.png")).unwrap();
    // 3 columns (no fine-tuning, 1, 2 steps) and 2 rows of 64 px cells plus labels.
    assert!(
        grid.width() >= 3 * 64 && grid.height() >= 2 * 64,
        "{}x{}",
        grid.width(),
        grid.height()
    );
    assert!(
        grid.width() < 5 * 64 && grid.height() < 4 * 64,
        "{}x{}",
        grid.width(),
        grid.height()
    );
    let text = read_png_text(&h.join("grid.png")).unwrap();
    assert!(
        text.iter()
            .any(|(k, v)| k == "unitune" && v.contains("\"mode\":\"grid\""))
    );
}

/// `unitune tune` on the fixture photo with `snapshots`, in `home`, as a child process whose
/// stderr the caller reads.
fn spawn_tune(home: &Path, model: &str, snapshots: &str) -> std::process::Child {
    Command::new(env!("CARGO_BIN_EXE_unitune"))
        .args([
            "tune",
            &photo(),
            "--model",
            model,
            "--train",
            "cross-kv",
            "--snapshots",
            snapshots,
            "--device",
            "cpu",
        ])
        .env("XDG_CACHE_HOME", home.join("cache"))
        .env("HF_HUB_OFFLINE", "1")
        .current_dir(home)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Ctrl-C during fine-tuning: exit 130 after the current step, the snapshots done so far and
/// where the run stood saved whole (no temporary file), and the same command then continues
/// from there to exactly the snapshots an uninterrupted run makes.
#[test]
fn ctrl_c_keeps_the_fine_tune_so_far_and_the_same_command_continues_it() {
    let home = tempfile::tempdir().unwrap();
    let h = home.path();
    let mut child = spawn_tune(h, &model(), "1,3");
    let stderr = child.stderr.take().unwrap();
    let mut lines = BufReader::new(stderr).lines();
    let mut seen = String::new();
    for line in lines.by_ref() {
        let line = line.unwrap();
        seen.push_str(&line);
        seen.push('\n');
        if line.starts_with("step 1/3") {
            break;
        }
    }
    let sent_at = Instant::now();
    let kill = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let rest: Vec<String> = lines.map(|l| l.unwrap()).collect();
    let status = child.wait().unwrap();
    let took = sent_at.elapsed();
    seen.push_str(&rest.join("\n"));
    assert_eq!(status.code(), Some(130), "{seen}");
    assert!(seen.contains("cancelled"), "{seen}");
    // One step of this run takes seconds on a quiet machine; the bound is loose for busy CI.
    // (That no step starts after the stop is asserted exactly in tests/jobs.rs.)
    assert!(took < Duration::from_secs(120), "stopping took {took:?}");
    let stopped_at: usize = seen
        .split("saved where fine-tuning stopped (after step ")
        .nth(1)
        .and_then(|rest| rest.split(')').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("where the run stopped was not saved: {seen}"));
    assert!((1..3).contains(&stopped_at), "{seen}");
    let entries = cache_files(h);
    assert_eq!(entries.len(), 1, "{seen}");
    let mut names: Vec<String> = std::fs::read_dir(&entries[0])
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(
        names,
        [
            "1.safetensors",
            "last-used",
            "photo.png",
            "resume.safetensors"
        ],
        "only whole files are left"
    );
    let leftovers: Vec<_> = std::fs::read_dir(h)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .filter(|n| n != "cache")
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");

    let listed = Command::new(env!("CARGO_BIN_EXE_unitune"))
        .arg("cache")
        .env("XDG_CACHE_HOME", h.join("cache"))
        .output()
        .unwrap();
    let listing = String::from_utf8_lossy(&listed.stdout);
    assert!(
        listing.contains(&format!("1 (stopped at {stopped_at})")) && listing.contains("photo.png"),
        "{listing}"
    );

    let again = spawn_tune(h, &model(), "1,3").wait_with_output().unwrap();
    let again_err = String::from_utf8_lossy(&again.stderr);
    assert_eq!(again.status.code(), Some(0), "{again_err}");
    assert!(
        again_err.contains(&format!(
            "continuing the stopped fine-tune after step {stopped_at}"
        )),
        "{again_err}"
    );
    assert!(
        !again_err.contains("step 1/3"),
        "the continued run started over: {again_err}"
    );
    assert!(!entries[0].join("resume.safetensors").exists());

    let straight_home = tempfile::tempdir().unwrap();
    let straight = spawn_tune(straight_home.path(), &model(), "1,3")
        .wait_with_output()
        .unwrap();
    assert_eq!(straight.status.code(), Some(0));
    let straight_entry = &cache_files(straight_home.path())[0];
    assert_eq!(
        straight_entry.file_name(),
        entries[0].file_name(),
        "the same model, photo and recipe are the same entry"
    );
    for file in ["1.safetensors", "3.safetensors"] {
        assert!(
            std::fs::read(straight_entry.join(file)).unwrap()
                == std::fs::read(entries[0].join(file)).unwrap(),
            "{file} of the continued run differs from an uninterrupted run's"
        );
    }
}

/// The cache key follows what the weights are: a copied model folder finds its snapshots, a
/// changed VAE does not; `unitune cache` lists, removes and clears the entries.
#[test]
fn the_snapshot_cache_follows_the_weights_and_can_be_listed_and_cleared() {
    let home = tempfile::tempdir().unwrap();
    let h = home.path();
    let original = h.join("models/original");
    copy_dir(&model_dir("sd15-tiny"), &original);
    let tune = |model: &Path| {
        let out = spawn_tune(h, &model.display().to_string(), "1")
            .wait_with_output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert_eq!(out.status.code(), Some(0), "{stderr}");
        stderr
    };
    assert!(tune(&original).contains("snapshots saved to"));

    let copy = h.join("models/copy");
    copy_dir(&original, &copy);
    let copied = tune(&copy);
    assert!(
        copied.contains("using cached snapshots"),
        "a copied model retrained: {copied}"
    );

    // Another VAE (here: one weight nudged in its lowest bits) is another model.
    let vae = copy.join("vae/diffusion_pytorch_model.safetensors");
    let mut bytes = std::fs::read(&vae).unwrap();
    let last = bytes.len() - 4;
    bytes[last] ^= 1;
    std::fs::write(&vae, &bytes).unwrap();
    let swapped = tune(&copy);
    assert!(
        swapped.contains("snapshots saved to"),
        "stale snapshots were used for another VAE: {swapped}"
    );

    let cache = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_unitune"))
            .arg("cache")
            .args(args)
            .env("XDG_CACHE_HOME", h.join("cache"))
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, listing, _) = cache(&[]);
    assert_eq!(code, Some(0));
    assert!(listing.contains("2 entries"), "{listing}");
    let first_key = cache_files(h)[0]
        .file_name()
        .unwrap()
        .to_string_lossy()
        .into_owned();
    let (code, _, stderr) = cache(&["remove", "no-such-key"]);
    assert_eq!(code, Some(2), "{stderr}");
    let (code, removed, stderr) = cache(&["remove", &first_key[..12]]);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(removed.starts_with("removed"), "{removed}");
    assert_eq!(cache_files(h).len(), 1);
    let (code, cleared, _) = cache(&["clear"]);
    assert_eq!(code, Some(0));
    assert!(cleared.contains("removed 1 cache entry"), "{cleared}");
    assert!(cache_files(h).is_empty());
}

/// A Stable Diffusion XL model (the tiny fixture: both text encoders, the pooled embedding and
/// the size numbers) fine-tunes in every training mode and edits, with the automatic region,
/// through the same commands as SD 1.5. Its numbers are checked against diffusers in
/// tests/sampling.rs and tests/components.rs; this is the whole path around them.
#[test]
fn an_sdxl_model_fine_tunes_in_every_mode_and_edits() {
    let home = tempfile::tempdir().unwrap();
    let h = home.path();
    let (m, p) = (model_dir("sdxl-tiny").display().to_string(), photo());
    for mode in ["full", "attention", "cross-kv", "lora"] {
        let out = format!("{mode}.png");
        let run = unitune(
            &[
                "edit",
                &p,
                "--prompt",
                "a cat wearing sunglasses",
                "--model",
                &m,
                "--train",
                mode,
                "--tune-steps",
                "1",
                "--snapshots",
                "1",
                "--t0",
                "0.8",
                "--sampling-steps",
                "2",
                "--device",
                "cpu",
                "--out",
                &out,
            ],
            h,
        );
        assert_eq!(run.code, 0, "{mode}: {}", run.stderr);
        assert!(
            run.stderr.contains("snapshots saved to"),
            "{mode}: {}",
            run.stderr
        );
        let recipe = common::png_recipe(&h.join(&out));
        let train = recipe["tuning"]["train"].as_str().unwrap();
        assert!(train.starts_with(mode), "{mode}: {train}");
        assert_eq!(recipe["model_family"], "SDXL");
        let text = read_png_text(&h.join(&out)).unwrap();
        let a1111 = text.iter().find(|(key, _)| key == "parameters").unwrap();
        assert!(a1111.1.contains("Model family: SDXL"), "{}", a1111.1);
        assert_eq!(recipe["model_prompt"], "beikkpic a cat wearing sunglasses");
    }
    // A lora-mode fine-tune exports under kohya's SDXL names (the UNet's SGM paths), which
    // the next edit applies (tests/lora.rs checks the values).
    let lora = unitune(
        &[
            "tune",
            &p,
            "--model",
            &m,
            "--train",
            "lora",
            "--snapshots",
            "1",
            "--device",
            "cpu",
            "--export-lora",
            "photo.safetensors",
        ],
        h,
    );
    assert_eq!(lora.code, 0, "{}", lora.stderr);
    let (layers, metadata) =
        unitune::engine::lora::read_kohya_file(&h.join("photo.safetensors")).unwrap();
    assert!(
        layers
            .iter()
            .all(|l| l.name.starts_with("lora_unet_input_blocks_")
                || l.name.starts_with("lora_unet_middle_block_")
                || l.name.starts_with("lora_unet_output_blocks_")),
        "{:?}",
        layers.iter().map(|l| &l.name).collect::<Vec<_>>()
    );
    assert_eq!(metadata["ss_base_model_version"], "sdxl_base_v1-0");
    let applied = unitune(
        &[
            "generate",
            "--model",
            &m,
            "--lora",
            "photo.safetensors",
            "-p",
            "beikkpic",
            "--sampling-steps",
            "1",
            "--device",
            "cpu",
            "-o",
            "applied.png",
        ],
        h,
    );
    assert_eq!(applied.code, 0, "{}", applied.stderr);
}
