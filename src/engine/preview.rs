//! Cheap live previews of the denoising, instead of a full VAE decode per step (which would
//! about halve sampling speed). Two kinds, chosen by [`PreviewMode`]:
//!
//! - **fast**: a linear map from latents to RGB, one pixel per latent ([`LatentPreview`]);
//! - **taesd**: the tiny autoencoder ([`TinyPreview`]), full resolution and close to the
//!   VAE's colours and detail, for a few milliseconds more per step.
//!
//! Both render a step's prediction of the clean latents (x0), as ComfyUI does.
//!
//! The map is fit to the loaded model's own VAE rather than hard-coded (the constants other
//! tools ship are for one VAE only): a few smooth synthetic images are encoded, they and a few
//! random latents of the same statistics are decoded, the decodes are area-averaged down to
//! latent resolution, and least squares gives `rgb = W^T z + b` per latent pixel.

use std::path::Path;
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor};
use image::RgbImage;

use super::error::{EngineError, Result};
use super::model::{StableDiffusion, tensor_to_image};
use super::noise::NoiseSource;
use super::taesd::TinyAutoencoder;
use super::vae::Vae;

/// Latent side of the fitting samples: 256 pixels per sample, 16 x 16 tiles for the VAE.
const FIT_LATENT_SIDE: usize = 16;
/// Smooth synthetic images encoded by the VAE (the image-latent relation that matters).
const FIT_IMAGES: usize = 4;
/// Random latents with the encoded latents' statistics (what early, noisy x0 guesses look like).
const FIT_RANDOM_LATENTS: usize = 2;
/// A VAE whose widest block has at most this many channels (the demo model's has 64; Stable
/// Diffusion's 512) decodes a preview in milliseconds: its own decode is shown instead of the
/// linear map, which such a small, saturated-colour VAE does not follow (the demo model's
/// map drew its white background pink).
const FULL_DECODE_MAX_CHANNELS: usize = 128;
/// Relative ridge added to the normal equations' diagonal, so a dead latent channel cannot
/// make the system singular.
const RIDGE: f64 = 1e-6;

/// A linear latent-to-RGB map fit to one model's VAE.
#[derive(Debug, Clone)]
pub struct LatentPreview {
    /// One row per latent channel: that channel's contribution to R, G and B in [-1, 1].
    weights: Vec<[f32; 3]>,
    bias: [f32; 3],
    /// The VAE's scaling factor: rendered latents are divided by it first, as decoding does.
    scaling_factor: f64,
    /// The model's own VAE and the dtype it computes in, when it is small enough to decode
    /// every preview (shared weights, not a copy).
    decoder: Option<(Vae, DType)>,
}

impl PartialEq for LatentPreview {
    /// The map; the decoder is the model's own and not compared.
    fn eq(&self, other: &Self) -> bool {
        self.weights == other.weights
            && self.bias == other.bias
            && self.scaling_factor == other.scaling_factor
    }
}

impl LatentPreview {
    /// A map from its parts (for tests and for maps computed elsewhere).
    pub fn from_parts(weights: Vec<[f32; 3]>, bias: [f32; 3], scaling_factor: f64) -> Self {
        Self {
            weights,
            bias,
            scaling_factor,
            decoder: None,
        }
    }

    /// True when previews are the model's own VAE decode rather than the linear map.
    pub fn decodes_fully(&self) -> bool {
        self.decoder.is_some()
    }

    pub fn weights(&self) -> &[[f32; 3]] {
        &self.weights
    }

    pub fn bias(&self) -> [f32; 3] {
        self.bias
    }

    /// Fits the map (only) to `model`'s VAE: a handful of VAE calls on 16 x 16 latents, once per model.
    /// The same seed gives the same map on the same device.
    pub fn fit(model: &StableDiffusion, seed: u64) -> Result<Self> {
        let device = model.device();
        let dtype = model.dtype();
        let factor = model.config.vae.downscale_factor();
        let channels = model.config.vae.latent_channels;
        let side = FIT_LATENT_SIDE * factor;
        let mut noise = NoiseSource::from_seed(seed);

        // Unscaled latents of smooth images, sampled from the latent distribution as
        // `StableDiffusion::encode_image` does: sampling works with such latents, not means.
        let images = synthetic_images(FIT_IMAGES, side, &mut noise)?
            .to_device(device)?
            .to_dtype(dtype)?;
        let distribution = model.vae.encode(&images)?;
        let sample_noise = noise
            .normal(distribution.mean.shape(), device)?
            .to_dtype(dtype)?;
        let encoded = distribution.sample(&sample_noise)?;
        // Random latents with the encoded latents' per-channel mean and spread.
        let channel_mean = encoded.mean_keepdim(0)?.mean_keepdim(2)?.mean_keepdim(3)?;
        let channel_std = encoded
            .broadcast_sub(&channel_mean)?
            .sqr()?
            .mean_keepdim(0)?
            .mean_keepdim(2)?
            .mean_keepdim(3)?
            .sqrt()?;
        let random = noise
            .normal(
                (
                    FIT_RANDOM_LATENTS,
                    channels,
                    FIT_LATENT_SIDE,
                    FIT_LATENT_SIDE,
                ),
                device,
            )?
            .to_dtype(dtype)?
            .broadcast_mul(&channel_std)?
            .broadcast_add(&channel_mean)?;
        let latents = Tensor::cat(&[&encoded, &random], 0)?;

        // What the preview stands in for: the clamped decode, averaged over each latent's area.
        let decoded = model.vae.decode(&latents)?.clamp(-1f32, 1f32)?;
        let targets = decoded.avg_pool2d(factor)?;

        let z = to_cpu_f32(&latents)?;
        let rgb = to_cpu_f32(&targets)?;
        let hw = FIT_LATENT_SIDE * FIT_LATENT_SIDE;
        let (weights, bias) = least_squares(&z, &rgb, channels, hw)?;
        Ok(Self {
            weights,
            bias,
            scaling_factor: model.config.vae.scaling_factor,
            decoder: None,
        })
    }

    /// The fast preview for `model`: the fitted map, or for a small VAE its own decode.
    pub fn for_model(model: &StableDiffusion, seed: u64) -> Result<Self> {
        let mut preview = Self::fit(model, seed)?;
        let small_vae = model
            .config
            .vae
            .block_out_channels
            .iter()
            .all(|&c| c <= FULL_DECODE_MAX_CHANNELS);
        if small_vae {
            preview.decoder = Some((model.vae.clone(), model.vae_dtype()));
        }
        Ok(preview)
    }

    /// Maps scaled latents `[1, c, h, w]` (as sampling produces them) to an h x w preview,
    /// or for a small VAE decodes them at full size.
    pub fn render(&self, latents: &Tensor) -> Result<RgbImage> {
        let (batch, channels, h, w) = latents.dims4()?;
        if let Some((vae, dtype)) = &self.decoder
            && batch == 1
            && channels == self.weights.len()
        {
            let input = (latents.to_dtype(*dtype)? / self.scaling_factor)?;
            return tensor_to_image(&vae.decode(&input)?);
        }
        if batch != 1 || channels != self.weights.len() {
            return Err(EngineError::InvalidRequest(format!(
                "a preview needs latents of shape [1, {}, h, w], got {:?}",
                self.weights.len(),
                latents.dims()
            )));
        }
        let values = latents
            .to_device(&Device::Cpu)?
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let plane = h * w;
        let inverse_scale = (1.0 / self.scaling_factor) as f32;
        let mut bytes = Vec::with_capacity(plane * 3);
        for pixel in 0..plane {
            let mut rgb = self.bias;
            for (c, row) in self.weights.iter().enumerate() {
                let z = values[c * plane + pixel] * inverse_scale;
                for (out, weight) in rgb.iter_mut().zip(row) {
                    *out += weight * z;
                }
            }
            // [-1, 1] to 8 bits, as `StableDiffusion::tensor_to_image` does.
            bytes.extend(
                rgb.iter()
                    .map(|v| ((v / 2.0 + 0.5).clamp(0.0, 1.0) * 255.0).round() as u8),
            );
        }
        RgbImage::from_raw(w as u32, h as u32, bytes)
            .ok_or_else(|| EngineError::InvalidRequest("the preview has an unexpected size".into()))
    }
}

/// How the denoising is previewed (`--preview`, and the editor's setting).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PreviewMode {
    /// The tiny autoencoder (madebyollin/taesd), downloaded once like a model.
    Taesd,
    /// The linear latent-to-RGB map fit to the model's own VAE.
    Fast,
    Off,
}

impl PreviewMode {
    pub const ALL: [PreviewMode; 3] = [PreviewMode::Taesd, PreviewMode::Fast, PreviewMode::Off];

    pub fn name(self) -> &'static str {
        match self {
            PreviewMode::Taesd => "taesd",
            PreviewMode::Fast => "fast",
            PreviewMode::Off => "off",
        }
    }
}

impl std::fmt::Display for PreviewMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for PreviewMode {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        PreviewMode::ALL
            .into_iter()
            .find(|mode| mode.name().eq_ignore_ascii_case(s))
            .ok_or_else(|| format!("unknown preview `{s}` (use taesd, fast or off)"))
    }
}

/// The tiny autoencoder as a preview of one Stable Diffusion model's latents.
#[derive(Debug, Clone)]
pub struct TinyPreview {
    vae: TinyAutoencoder,
}

impl TinyPreview {
    /// Loads the tiny VAE onto `model`'s device in its compute dtype, and checks that it
    /// decodes that model's latents (channels and scale).
    pub fn load(config_file: &Path, weights_file: &Path, model: &StableDiffusion) -> Result<Self> {
        let vae = TinyAutoencoder::load(config_file, weights_file, model.device(), model.dtype())?;
        Self::new(vae, model)
    }

    pub fn new(vae: TinyAutoencoder, model: &StableDiffusion) -> Result<Self> {
        let tiny = vae.config();
        let full = &model.config.vae;
        if tiny.latent_channels != full.latent_channels
            || tiny.decoder_upscale_factor() != full.downscale_factor()
            || tiny.out_channels != 3
        {
            return Err(EngineError::InvalidRequest(format!(
                "the tiny VAE decodes {}-channel latents {}x larger into {} channels, but this model's VAE decodes {}-channel latents {}x larger into RGB; it cannot preview this model",
                tiny.latent_channels,
                tiny.decoder_upscale_factor(),
                tiny.out_channels,
                full.latent_channels,
                full.downscale_factor()
            )));
        }
        Ok(Self { vae })
    }

    /// The tiny decode of the UNet's (scaled) latents `[1, c, h, w]`, at full image size.
    ///
    /// diffusers' pipelines decode `latents / vae.config.scaling_factor` with whichever VAE
    /// they hold (plus `shift_factor` where a pipeline knows it); taesd's factor is 1 because
    /// it was trained on the UNet's latents as they are, not on the full VAE's unscaled ones.
    pub fn render(&self, latents: &Tensor) -> Result<RgbImage> {
        let config = self.vae.config();
        let input = latents
            .to_dtype(self.vae.dtype())?
            .affine(1.0 / config.scaling_factor, config.shift_factor)?;
        tensor_to_image(&self.vae.decode(&input)?)
    }
}

/// One of the previews, ready to render.
#[derive(Debug, Clone, Copy)]
pub enum Previewer<'a> {
    Fast(&'a LatentPreview),
    Tiny(&'a TinyPreview),
}

impl Previewer<'_> {
    /// Renders scaled latents `[1, c, h, w]` (a step's x0 prediction).
    pub fn render(&self, latents: &Tensor) -> Result<RgbImage> {
        match self {
            Previewer::Fast(map) => map.render(latents),
            Previewer::Tiny(tiny) => tiny.render(latents),
        }
    }
}

/// Keeps previews to a share of the wall time. The tiny VAE takes milliseconds on a GPU but
/// seconds at 512 px on a CPU (measured 3.8 s on 2 cores against 29 s for the full VAE), so
/// there a step that comes too soon after the last preview gets none.
#[derive(Debug, Clone, Default)]
pub struct PreviewThrottle {
    /// When the last preview ended, and how long it took.
    last: Option<(Instant, Duration)>,
}

impl PreviewThrottle {
    /// Previews take at most about this share of the time.
    const MAX_SHARE: u32 = 4;

    pub fn new() -> Self {
        Self::default()
    }

    /// Whether a preview is due: the first always, later ones once the time since the last
    /// ended is at least `MAX_SHARE - 1` times what it took.
    pub fn due(&self) -> bool {
        self.last
            .is_none_or(|(ended, took)| ended.elapsed() >= took * (Self::MAX_SHARE - 1))
    }

    /// Renders `latents` with `previewer` and remembers how long it took.
    pub fn render(&mut self, previewer: Previewer, latents: &Tensor) -> Result<RgbImage> {
        let start = Instant::now();
        let image = previewer.render(latents);
        self.last = Some((Instant::now(), start.elapsed()));
        image
    }
}

/// The previews at hand for one model.
#[derive(Debug, Clone, Default)]
pub struct Previews {
    pub fast: Option<LatentPreview>,
    pub tiny: Option<TinyPreview>,
}

impl Previews {
    /// The preview `mode` asks for; the fast one stands in for a tiny VAE that is missing.
    pub fn pick(&self, mode: PreviewMode) -> Option<Previewer<'_>> {
        match (mode, &self.tiny, &self.fast) {
            (PreviewMode::Off, _, _) => None,
            (PreviewMode::Taesd, Some(tiny), _) => Some(Previewer::Tiny(tiny)),
            (_, _, fast) => fast.as_ref().map(Previewer::Fast),
        }
    }
}

fn to_cpu_f32(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.to_device(&Device::Cpu)?
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?)
}

/// `count` smooth images `[count, 3, side, side]` in [-1, 1]: a bilinear blend of four random
/// corner colours plus a low-frequency wave, so colours and gradients vary but edges do not.
fn synthetic_images(count: usize, side: usize, noise: &mut NoiseSource) -> Result<Tensor> {
    let params = noise
        .normal((count, 4 * 3 + 3 + 2), &Device::Cpu)?
        .to_vec2::<f32>()?;
    let mut data = Vec::with_capacity(count * 3 * side * side);
    for p in &params {
        // Corner colours in about [-0.8, 0.8]; wave amplitude, phase and direction.
        let corner = |k: usize, c: usize| (p[k * 3 + c] * 0.5).tanh() * 0.8;
        let (fx, fy) = (p[15].abs() + 0.5, p[16].abs() + 0.5);
        for c in 0..3 {
            let amplitude = 0.3 * p[12 + c].tanh();
            for y in 0..side {
                let v = y as f32 / (side - 1).max(1) as f32;
                for x in 0..side {
                    let u = x as f32 / (side - 1).max(1) as f32;
                    let blend = corner(0, c) * (1.0 - u) * (1.0 - v)
                        + corner(1, c) * u * (1.0 - v)
                        + corner(2, c) * (1.0 - u) * v
                        + corner(3, c) * u * v;
                    let wave =
                        amplitude * (std::f32::consts::PI * (fx * u + fy * v) + c as f32).sin();
                    data.push((blend + wave).clamp(-1.0, 1.0));
                }
            }
        }
    }
    Ok(Tensor::from_vec(
        data,
        (count, 3, side, side),
        &Device::Cpu,
    )?)
}

/// Least squares for `rgb = W^T z + b` over every pixel of `[b, c, hw]` latents `z` and
/// `[b, 3, hw]` targets, through the (c+1) x (c+1) normal equations.
///
/// Solved by hand: the system is 5 x 5 for every Stable Diffusion VAE, and a linear-algebra
/// crate (nalgebra, or ndarray with LAPACK) would be a large dependency for 30 lines.
fn least_squares(
    z: &[f32],
    rgb: &[f32],
    channels: usize,
    hw: usize,
) -> Result<(Vec<[f32; 3]>, [f32; 3])> {
    let samples = z.len() / channels;
    if channels == 0
        || hw == 0
        || samples == 0
        || samples * 3 != rgb.len()
        || !samples.is_multiple_of(hw)
    {
        return Err(EngineError::InvalidRequest(
            "the preview fit got latents and targets of different sizes".into(),
        ));
    }
    let n = channels + 1;
    let mut ata = vec![0f64; n * n];
    let mut aty = vec![0f64; n * 3];
    let mut feature = vec![0f64; n];
    for sample in 0..samples {
        let (b, pixel) = (sample / hw, sample % hw);
        for (c, f) in feature.iter_mut().take(channels).enumerate() {
            *f = z[(b * channels + c) * hw + pixel] as f64;
        }
        feature[channels] = 1.0;
        for i in 0..n {
            for j in 0..n {
                ata[i * n + j] += feature[i] * feature[j];
            }
            for k in 0..3 {
                aty[i * 3 + k] += feature[i] * rgb[(b * 3 + k) * hw + pixel] as f64;
            }
        }
    }
    let trace: f64 = (0..n).map(|i| ata[i * n + i]).sum();
    for i in 0..n {
        ata[i * n + i] += RIDGE * trace / n as f64;
    }
    let solution = solve(&mut ata, &mut aty, n, 3).ok_or_else(|| {
        EngineError::InvalidRequest("the VAE's latents are degenerate; no preview map fits".into())
    })?;
    let weights = (0..channels)
        .map(|c| {
            [
                solution[c * 3] as f32,
                solution[c * 3 + 1] as f32,
                solution[c * 3 + 2] as f32,
            ]
        })
        .collect();
    let bias = [
        solution[channels * 3] as f32,
        solution[channels * 3 + 1] as f32,
        solution[channels * 3 + 2] as f32,
    ];
    Ok((weights, bias))
}

/// Solves `a x = b` for an `n x n` matrix and `m` right-hand sides (row-major, both
/// overwritten) by Gaussian elimination with partial pivoting. `None` when singular.
fn solve(a: &mut [f64], b: &mut [f64], n: usize, m: usize) -> Option<Vec<f64>> {
    for col in 0..n {
        let pivot =
            (col..n).max_by(|&r, &s| a[r * n + col].abs().total_cmp(&a[s * n + col].abs()))?;
        if a[pivot * n + col].abs() < 1e-12 {
            return None;
        }
        if pivot != col {
            for k in 0..n {
                a.swap(pivot * n + k, col * n + k);
            }
            for k in 0..m {
                b.swap(pivot * m + k, col * m + k);
            }
        }
        for row in col + 1..n {
            let factor = a[row * n + col] / a[col * n + col];
            for k in col..n {
                a[row * n + k] -= factor * a[col * n + k];
            }
            for k in 0..m {
                b[row * m + k] -= factor * b[col * m + k];
            }
        }
    }
    let mut x = vec![0f64; n * m];
    for row in (0..n).rev() {
        for k in 0..m {
            let mut sum = b[row * m + k];
            for j in row + 1..n {
                sum -= a[row * n + j] * x[j * m + k];
            }
            x[row * m + k] = sum / a[row * n + row];
        }
    }
    Some(x)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn solve_recovers_a_known_solution() {
        // A symmetric positive definite 3 x 3 system with two right-hand sides.
        let mut a = vec![4.0, 1.0, 0.5, 1.0, 3.0, 0.2, 0.5, 0.2, 2.0];
        let x_true = [1.0, -2.0, 0.5, 3.0, 2.0, -1.0];
        let mut b = vec![0.0; 6];
        for i in 0..3 {
            for k in 0..2 {
                b[i * 2 + k] = (0..3).map(|j| a[i * 3 + j] * x_true[j * 2 + k]).sum();
            }
        }
        let x = solve(&mut a, &mut b, 3, 2).unwrap();
        for (got, want) in x.iter().zip(x_true) {
            assert!((got - want).abs() < 1e-12, "{got} vs {want}");
        }
    }

    #[test]
    fn the_throttle_waits_three_times_a_previews_cost() {
        let mut throttle = PreviewThrottle::new();
        assert!(throttle.due(), "the first preview is always due");
        throttle.last = Some((Instant::now(), Duration::from_secs(60)));
        assert!(!throttle.due());
        let ended = Instant::now() - Duration::from_millis(40);
        throttle.last = Some((ended, Duration::from_millis(10)));
        assert!(throttle.due());
    }

    #[test]
    fn solve_reports_a_singular_system() {
        let mut a = vec![1.0, 2.0, 2.0, 4.0];
        let mut b = vec![1.0, 2.0];
        assert!(solve(&mut a, &mut b, 2, 1).is_none());
    }

    #[test]
    fn least_squares_recovers_an_exact_linear_map() {
        // Two images of 16 x 16 pixels, 2 latent channels, rgb = W^T z + b exactly.
        let hw = FIT_LATENT_SIDE * FIT_LATENT_SIDE;
        let w = [[0.5f32, -0.25, 0.1], [0.2, 0.3, -0.4]];
        let bias = [0.05f32, -0.1, 0.2];
        let mut noise = NoiseSource::from_seed(3);
        let z = noise
            .normal(2 * 2 * hw, &Device::Cpu)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let mut rgb = vec![0f32; 2 * 3 * hw];
        for b in 0..2 {
            for p in 0..hw {
                for k in 0..3 {
                    rgb[(b * 3 + k) * hw + p] =
                        bias[k] + w[0][k] * z[(b * 2) * hw + p] + w[1][k] * z[(b * 2 + 1) * hw + p];
                }
            }
        }
        let (got_w, got_b) = least_squares(&z, &rgb, 2, hw).unwrap();
        for (row, want) in got_w.iter().zip(w) {
            for (g, t) in row.iter().zip(want) {
                assert!((g - t).abs() < 1e-4, "{g} vs {t}");
            }
        }
        for (g, t) in got_b.iter().zip(bias) {
            assert!((g - t).abs() < 1e-4, "{g} vs {t}");
        }
    }
}
