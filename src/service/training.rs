//! How to fine-tune on the photo, as a person chooses it (training mode, optimizer, learning
//! rate, snapshot ladder, micro-batch), turned into the engine's [`TuneSettings`] in one place
//! for the command line and the editor alike.

use std::str::FromStr;

use super::error::{Result, ServiceError};
use crate::engine::finetune::{PAPER_SNAPSHOTS, RARE_TOKEN, TrainMode, TuneSettings};
use crate::engine::optim::{OptimizerKind, OptimizerSettings};

/// Photos per forward pass: the largest that fits, or a fixed number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MicroBatch {
    /// The largest the device's free memory holds (up to the batch), smaller if a pass still
    /// runs out of memory.
    #[default]
    Auto,
    Fixed(usize),
}

impl FromStr for MicroBatch {
    type Err = String;

    /// `auto` or a number above 0.
    fn from_str(text: &str) -> std::result::Result<Self, String> {
        if text.trim().eq_ignore_ascii_case("auto") {
            return Ok(Self::Auto);
        }
        match text.trim().parse::<usize>() {
            Ok(n) if n > 0 => Ok(Self::Fixed(n)),
            _ => Err(format!(
                "the micro-batch must be auto or a number of photos that divides the batch, not {text}"
            )),
        }
    }
}

impl std::fmt::Display for MicroBatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Auto => f.write_str("auto"),
            Self::Fixed(n) => write!(f, "{n}"),
        }
    }
}

/// A fine-tuning recipe as chosen; [`TrainingChoice::settings`] makes it the engine's.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainingChoice {
    /// What is trained (a LoRA's rank included).
    pub mode: TrainMode,
    pub optimizer: OptimizerKind,
    pub learning_rate: f64,
    /// Keep f32 master copies of half-precision weights (see
    /// [`OptimizerSettings::master_weights`]).
    pub master_weights: bool,
    /// Step counts after which snapshots are kept, in any order; the largest is the length.
    pub snapshot_steps: Vec<usize>,
    /// Photos per optimizer step (the paper's 4).
    pub batch_size: usize,
    pub micro_batch: MicroBatch,
    /// The rare token the photo is bound to.
    pub token: String,
    /// Seed of the fine-tuning noise.
    pub seed: u64,
}

impl Default for TrainingChoice {
    /// The paper's recipe: the full model, Adafactor at 1e-4, batch 4, snapshots after 16,
    /// 32, 64 and 128 steps, bound to "beikkpic".
    fn default() -> Self {
        let paper = TuneSettings::default();
        Self {
            mode: paper.mode,
            optimizer: paper.optimizer.kind,
            learning_rate: paper.optimizer.learning_rate,
            master_weights: paper.optimizer.master_weights,
            snapshot_steps: PAPER_SNAPSHOTS.to_vec(),
            batch_size: paper.batch_size,
            micro_batch: MicroBatch::Auto,
            token: RARE_TOKEN.to_owned(),
            seed: paper.seed,
        }
    }
}

impl TrainingChoice {
    /// The engine's settings, with `extra_snapshot` kept too (the snapshot an edit samples
    /// from, when the ladder lacks it); an impossible choice is refused in one sentence.
    pub fn settings(&self, extra_snapshot: Option<usize>) -> Result<TuneSettings> {
        let mut snapshot_steps = self.snapshot_steps.clone();
        snapshot_steps.extend(extra_snapshot.filter(|s| *s > 0));
        snapshot_steps.sort_unstable();
        snapshot_steps.dedup();
        let (micro_batch_size, auto_micro_batch) = match self.micro_batch {
            MicroBatch::Auto => (self.batch_size, true),
            MicroBatch::Fixed(n) => (n, false),
        };
        let settings = TuneSettings {
            mode: self.mode,
            optimizer: OptimizerSettings {
                kind: self.optimizer,
                learning_rate: self.learning_rate,
                master_weights: self.master_weights,
                ..OptimizerSettings::default()
            },
            snapshot_steps,
            batch_size: self.batch_size,
            micro_batch_size,
            auto_micro_batch,
            token: self.token.clone(),
            seed: self.seed,
            ..TuneSettings::default()
        };
        settings
            .validate()
            .map_err(|e| ServiceError::Invalid(e.to_string()))?;
        Ok(settings)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_choice_is_the_papers_recipe() {
        let settings = TrainingChoice::default().settings(None).unwrap();
        assert_eq!(settings, TuneSettings::default());
    }

    #[test]
    fn an_edits_snapshot_joins_the_ladder_once_in_order() {
        let choice = TrainingChoice {
            snapshot_steps: vec![32, 16],
            ..TrainingChoice::default()
        };
        assert_eq!(
            choice.settings(Some(24)).unwrap().snapshot_steps,
            [16, 24, 32]
        );
        assert_eq!(choice.settings(Some(16)).unwrap().snapshot_steps, [16, 32]);
        assert_eq!(choice.settings(Some(0)).unwrap().snapshot_steps, [16, 32]);
    }

    #[test]
    fn impossible_choices_are_refused_in_a_sentence() {
        let three = TrainingChoice {
            micro_batch: MicroBatch::Fixed(3),
            ..TrainingChoice::default()
        };
        let message = three.settings(None).unwrap_err().to_string();
        assert!(message.contains("micro-batch size (3)"), "{message}");
        assert_eq!("auto".parse(), Ok(MicroBatch::Auto));
        assert_eq!(" 2".parse(), Ok(MicroBatch::Fixed(2)));
        assert!("0".parse::<MicroBatch>().is_err());
    }
}
