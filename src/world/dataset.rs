//! The demo model's training set, written for the training script
//! (`assets/demo-model/train.py`) to read without any image library.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;

use anyhow::{Context, Result};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use super::caption;
use super::scene::Scene;

/// Captions per scene besides the full one: the script picks one of them at each step.
const PARTIAL_CAPTIONS: usize = 3;

/// Writes `count` scenes drawn with `seed` into `dir`: `images.rgb` (the renders, `count` x 64
/// x 64 x 3 bytes, row-major RGB) and `captions.jsonl` (per scene, its full caption first, then
/// partial ones).
pub fn write_dataset(dir: &Path, count: usize, seed: u64) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let create = |name: &str| -> Result<BufWriter<File>> {
        let path = dir.join(name);
        Ok(BufWriter::new(File::create(&path).with_context(|| {
            format!("cannot write {}", path.display())
        })?))
    };
    let mut images = create("images.rgb")?;
    let mut captions = create("captions.jsonl")?;
    for _ in 0..count {
        let scene = Scene::random(&mut rng);
        images.write_all(scene.render().as_raw())?;
        let mut texts = vec![caption::full(&scene)];
        texts.extend((0..PARTIAL_CAPTIONS).map(|_| caption::partial(&scene, &mut rng)));
        serde_json::to_writer(&mut captions, &texts)?;
        captions.write_all(b"\n")?;
    }
    images.flush()?;
    captions.flush()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_dataset_is_the_seeded_scenes_rendered_and_captioned() {
        let dir = tempfile::tempdir().unwrap();
        write_dataset(dir.path(), 5, 9).unwrap();
        let images = std::fs::read(dir.path().join("images.rgb")).unwrap();
        assert_eq!(images.len(), 5 * 64 * 64 * 3);
        let captions = std::fs::read_to_string(dir.path().join("captions.jsonl")).unwrap();
        let lines: Vec<Vec<String>> = captions
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 5);
        let mut rng = ChaCha8Rng::seed_from_u64(9);
        let first = Scene::random(&mut rng);
        assert_eq!(&images[..64 * 64 * 3], first.render().as_raw().as_slice());
        assert_eq!(lines[0][0], caption::full(&first));
        assert_eq!(lines[0].len(), 1 + PARTIAL_CAPTIONS);
        // Same seed, same bytes.
        let again = tempfile::tempdir().unwrap();
        write_dataset(again.path(), 5, 9).unwrap();
        assert_eq!(
            std::fs::read(again.path().join("images.rgb")).unwrap(),
            images
        );
    }
}
