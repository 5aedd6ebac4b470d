//! `unitune edit --instruct` end to end on the tiny InstructPix2Pix pipeline: the result and its
//! recipe, and the clear refusals when the method and the model do not go together.

mod common;

use common::{fixtures, instruct_model_dir, model_dir, png_recipe, unitune};
use unitune::imaging::read_png_text;

fn photo() -> String {
    fixtures().join("photos/chelsea.png").display().to_string()
}

#[test]
fn an_instruction_edit_needs_no_fine_tuning_and_records_its_method() {
    let home = tempfile::tempdir().unwrap();
    let h = home.path();
    let model = instruct_model_dir(h).display().to_string();
    let p = photo();
    let edit = |out: &str, extra: &[&str]| {
        let mut args = vec![
            "edit",
            &p,
            "--instruct",
            "make it winter",
            "--model",
            &model,
            "--seed",
            "4",
            "--sampling-steps",
            "3",
            "--device",
            "cpu",
            "--out",
            out,
        ];
        args.extend_from_slice(extra);
        unitune(&args, h)
    };
    let run = edit("winter.png", &[]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert!(
        run.stderr.contains("image guidance 1.50"),
        "the default image guidance is said: {}",
        run.stderr
    );
    assert!(
        !h.join("cache/unitune/snapshots").exists(),
        "nothing was fine-tuned"
    );
    let written = image::open(h.join("winter.png")).unwrap();
    assert_eq!(
        (written.width(), written.height()),
        (451, 300),
        "the photo's own size"
    );
    let r = png_recipe(&h.join("winter.png"));
    assert_eq!(r["method"], "instruct-pix2pix");
    assert_eq!(r["image_guidance"], 1.5);
    assert_eq!(r["guidance_weight"], 7.5);
    assert_eq!(r["model_prompt"], "make it winter", "no rare token");
    assert!(r["t0_fraction"].is_null() && r["tuning"].is_null());
    let parameters = read_png_text(&h.join("winter.png")).unwrap();
    let a1111 = &parameters
        .iter()
        .find(|(k, _)| k == "parameters")
        .unwrap()
        .1;
    assert!(a1111.contains("Image CFG scale: 1.5"), "{a1111}");

    // The fidelity knob moves the image guidance, and so the result.
    let faithful = edit("faithful.png", &["--fidelity", "1"]);
    assert_eq!(faithful.code, 0, "{}", faithful.stderr);
    assert_eq!(png_recipe(&h.join("faithful.png"))["image_guidance"], 2.5);
    assert_ne!(
        image::open(h.join("faithful.png")).unwrap().to_rgb8(),
        written.to_rgb8()
    );
}

#[test]
fn method_and_model_that_do_not_go_together_are_refused_in_one_line() {
    let home = tempfile::tempdir().unwrap();
    let h = home.path();
    let p = photo();
    let plain = model_dir("sd15-tiny").display().to_string();
    let run = unitune(
        &[
            "edit",
            &p,
            "--instruct",
            "make it winter",
            "--model",
            &plain,
            "--device",
            "cpu",
        ],
        h,
    );
    assert_eq!(run.code, 2, "{}", run.stderr);
    assert_eq!(
        run.stderr
            .trim()
            .lines()
            .last()
            .map(|l| l.starts_with("error: ")),
        Some(true),
        "{}",
        run.stderr
    );
    assert!(
        run.stderr
            .contains("--instruct needs an InstructPix2Pix model")
            && run.stderr.contains("timbrooks/instruct-pix2pix"),
        "{}",
        run.stderr
    );

    let instruct = instruct_model_dir(h).display().to_string();
    let run = unitune(
        &[
            "edit",
            &p,
            "--prompt",
            "a snowy cat",
            "--model",
            &instruct,
            "--device",
            "cpu",
        ],
        h,
    );
    assert_eq!(run.code, 2, "{}", run.stderr);
    assert!(
        run.stderr.contains("is an InstructPix2Pix model"),
        "{}",
        run.stderr
    );

    for args in [
        vec!["edit", p.as_str(), "--instruct", "x", "--prompt", "y"],
        vec!["edit", p.as_str(), "--instruct", "x", "--t0", "0.5"],
        vec!["edit", p.as_str()],
        vec!["edit", p.as_str(), "--prompt", "y", "--image-guidance", "2"],
    ] {
        let run = unitune(&args, h);
        assert_eq!(run.code, 2, "{args:?}: {}", run.stderr);
    }
}
