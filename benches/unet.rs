//! UNet speed on the CPU: our UNet's forward and forward+backward against candle-transformers'
//! UNet forward (the baseline), on the same random weights, in one run.
//!
//! Run: `cargo bench --bench unet`. Prints one line per config with median times and the
//! ratio ours/baseline (below 1 means ours is faster).

use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use candle_transformers::models::stable_diffusion::unet_2d::{
    BlockConfig, UNet2DConditionModel, UNet2DConditionModelConfig,
};
use unitune::engine::config::UnetConfig;
use unitune::engine::unet::UNet;

struct BenchConfig {
    name: &'static str,
    channels: &'static [usize],
    /// Per block: does it have cross-attention (all but the last, as in SD).
    layers_per_block: usize,
    heads: usize,
    cross_attention_dim: usize,
    latent_side: usize,
    iterations: usize,
}

const CONFIGS: &[BenchConfig] = &[
    BenchConfig {
        name: "tiny (32,64) latent 16",
        channels: &[32, 64],
        layers_per_block: 2,
        heads: 8,
        cross_attention_dim: 32,
        latent_side: 16,
        iterations: 20,
    },
    BenchConfig {
        name: "mid (64,128,256,256) ctx 768 latent 32",
        channels: &[64, 128, 256, 256],
        layers_per_block: 2,
        heads: 8,
        cross_attention_dim: 768,
        latent_side: 32,
        iterations: 9,
    },
];

fn our_config(c: &BenchConfig) -> UnetConfig {
    let n = c.channels.len();
    let down: Vec<&str> = (0..n)
        .map(|i| {
            if i + 1 < n {
                "CrossAttnDownBlock2D"
            } else {
                "DownBlock2D"
            }
        })
        .collect();
    let up: Vec<&str> = (0..n)
        .map(|i| {
            if i == 0 {
                "UpBlock2D"
            } else {
                "CrossAttnUpBlock2D"
            }
        })
        .collect();
    let json = serde_json::json!({
        "block_out_channels": c.channels,
        "down_block_types": down,
        "up_block_types": up,
        "layers_per_block": c.layers_per_block,
        "attention_head_dim": c.heads,
        "cross_attention_dim": c.cross_attention_dim,
        "norm_num_groups": 32,
        "sample_size": c.latent_side,
    });
    UnetConfig::from_json(&json.to_string(), "bench config".as_ref())
        .expect("bench config is valid")
}

fn baseline_config(c: &BenchConfig) -> UNet2DConditionModelConfig {
    let n = c.channels.len();
    UNet2DConditionModelConfig {
        center_input_sample: false,
        flip_sin_to_cos: true,
        freq_shift: 0.0,
        blocks: c
            .channels
            .iter()
            .enumerate()
            .map(|(i, &out_channels)| BlockConfig {
                out_channels,
                use_cross_attn: (i + 1 < n).then_some(1),
                attention_head_dim: c.heads,
            })
            .collect(),
        layers_per_block: c.layers_per_block,
        downsample_padding: 1,
        mid_block_scale_factor: 1.0,
        norm_num_groups: 32,
        norm_eps: 1e-5,
        cross_attention_dim: c.cross_attention_dim,
        sliced_attention_size: None,
        use_linear_projection: false,
    }
}

fn median(mut times: Vec<Duration>) -> Duration {
    times.sort();
    times[times.len() / 2]
}

fn time<F: FnMut() -> candle_core::Result<()>>(
    iterations: usize,
    mut f: F,
) -> candle_core::Result<Duration> {
    f()?; // warm-up
    let mut times = Vec::with_capacity(iterations);
    for _ in 0..iterations {
        let start = Instant::now();
        f()?;
        times.push(start.elapsed());
    }
    Ok(median(times))
}

fn main() -> candle_core::Result<()> {
    let device = Device::Cpu;
    println!("UNet on CPU, f32, batch 2 (one guided step); median of N runs after a warm-up");
    println!("baseline: candle-transformers 0.11 UNet2DConditionModel forward");
    for c in CONFIGS {
        // Random weights with diffusers' names, shared by both models.
        let varmap = VarMap::new();
        let config = our_config(c);
        let ours = UNet::new(
            &config,
            VarBuilder::from_varmap(&varmap, DType::F32, &device),
        )?;
        let tensors = varmap
            .data()
            .lock()
            .map_err(|_| candle_core::Error::Msg("varmap lock poisoned".into()))?
            .iter()
            .map(|(k, v)| (k.clone(), v.as_tensor().detach()))
            .collect();
        let baseline = UNet2DConditionModel::new(
            VarBuilder::from_tensors(tensors, DType::F32, &device),
            4,
            4,
            false,
            baseline_config(c),
        )?;

        let side = c.latent_side;
        let sample = Tensor::randn(0f32, 1.0, (2, 4, side, side), &device)?;
        let context = Tensor::randn(0f32, 1.0, (2, 77, c.cross_attention_dim), &device)?;
        let timesteps = Tensor::new(&[501f32, 501.0], &device)?;

        let baseline_forward = time(c.iterations, || {
            baseline.forward(&sample, 501.0, &context).map(|_| ())
        })?;
        let our_forward = time(c.iterations, || {
            ours.forward(&sample, &timesteps, &context).map(|_| ())
        })?;

        // Forward + backward with every weight trainable (the paper's full fine-tune).
        let vars: Vec<Var> = varmap.all_vars();
        let our_train = time(c.iterations, || {
            let loss = ours
                .forward(&sample, &timesteps, &context)?
                .sqr()?
                .mean_all()?;
            let grads = loss.backward()?;
            debug_assert!(grads.get(vars[0].as_tensor()).is_some());
            Ok(())
        })?;

        println!(
            "{:<42} baseline fwd {:>8.1} ms | ours fwd {:>8.1} ms (ratio {:.2}) | ours fwd+bwd {:>8.1} ms ({:.2}x baseline fwd)",
            c.name,
            baseline_forward.as_secs_f64() * 1e3,
            our_forward.as_secs_f64() * 1e3,
            our_forward.as_secs_f64() / baseline_forward.as_secs_f64(),
            our_train.as_secs_f64() * 1e3,
            our_train.as_secs_f64() / baseline_forward.as_secs_f64(),
        );
    }
    Ok(())
}
