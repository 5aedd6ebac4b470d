//! The one fidelity-expressiveness knob: `fidelity` in [0, 1] chooses how many fine-tuning
//! steps (which snapshot), the SDEdit start t0 and the guidance weight together.
//!
//! Each model family has its own table ([`FidelityTable`]): what a fidelity means in steps,
//! t0 and guidance depends on the model. Stable Diffusion's (UniTune table 1 and section 3.3,
//! adapted to Stable Diffusion's guidance range, not yet measured on SD):
//!
//! | fidelity | snapshot (steps) | t0   | guidance |
//! |----------|------------------|------|----------|
//! | 0.00     | 16               | 1.00 | 12.0     |
//! | 0.25     | 32               | 1.00 | 10.0     |
//! | 0.50     | 64               | 0.96 | 9.0      |
//! | 0.75     | 64               | 0.92 | 8.0      |
//! | 1.00     | 128              | 0.88 | 7.5      |
//!
//! t0 and guidance are interpolated linearly between rows; the snapshot is the row's whose
//! fidelity is nearest (then mapped to the nearest snapshot actually saved, never more
//! steps at lower fidelity). Higher fidelity therefore never means fewer fine-tuning steps,
//! a later t0 or stronger guidance. The paper used guidance 32 with Imagen; Stable Diffusion
//! saturates far earlier, and its UniTune port uses 7 to 16.

/// One row of the table.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EditParameters {
    /// Fine-tuning steps of the snapshot to sample from (0 = the untuned model).
    pub tune_steps: usize,
    /// SDEdit start in [0, 1].
    pub t0_fraction: f64,
    pub guidance_weight: f64,
}

/// A model family's fidelity table: rows at fidelity 0, 0.25, 0.5, 0.75 and 1.
#[derive(Debug, PartialEq)]
pub struct FidelityTable {
    /// The name a model folder's `model_index.json` gives in `_unitune_fidelity_table`.
    pub name: &'static str,
    /// Where the numbers come from, in a few words (the model panel and recipes say it).
    pub source: &'static str,
    rows: [(f64, EditParameters); 5],
}

const fn row(
    fidelity: f64,
    tune_steps: usize,
    t0_fraction: f64,
    guidance_weight: f64,
) -> (f64, EditParameters) {
    (
        fidelity,
        EditParameters {
            tune_steps,
            t0_fraction,
            guidance_weight,
        },
    )
}

/// Stable Diffusion's rows (1.x and 2.x): the table above, starting points adapted from the
/// paper, not yet measured on SD (no SD weights reach our machines).
const SD_ROWS: [(f64, EditParameters); 5] = [
    row(0.00, 16, 1.00, 12.0),
    row(0.25, 32, 1.00, 10.0),
    row(0.50, 64, 0.96, 9.0),
    row(0.75, 64, 0.92, 8.0),
    row(1.00, 128, 0.88, 7.5),
];

pub static STABLE_DIFFUSION: FidelityTable = FidelityTable {
    name: "stable-diffusion",
    source: "adapted from the paper, not yet calibrated",
    rows: SD_ROWS,
};

/// Stable Diffusion XL's rows: Stable Diffusion's snapshots and t0, with guidance scaled to
/// SDXL's range (diffusers samples it at 5 where SD 1.5 takes 7.5, and it saturates sooner):
/// each SD weight times 2/3. Adapted, not calibrated: no SDXL weights reach our machines.
pub static STABLE_DIFFUSION_XL: FidelityTable = FidelityTable {
    name: "stable-diffusion-xl",
    source: "adapted from Stable Diffusion's, not yet calibrated",
    rows: [
        row(0.00, 16, 1.00, 8.0),
        row(0.25, 32, 1.00, 6.7),
        row(0.50, 64, 0.96, 6.0),
        row(0.75, 64, 0.92, 5.3),
        row(1.00, 128, 0.88, 5.0),
    ],
};

/// The demo model (`assets/demo-model`), calibrated by `unitune eval --model demo` (4 scenes,
/// 12 edits, t0 0.6/0.8/1.0 at guidance 7.5; docs/edit-quality.md): the Pareto front of its
/// UniTune points, as the benchmark proposes it. 16 steps at t0 1.0 is the most expressive
/// (success 0.58, fidelity 0.46), 128 steps at t0 1.0 the middle (0.50, 0.54), 128 steps at
/// t0 0.8 the most faithful (0.42, 0.62; t0 0.9 in between: 0.42, 0.64). Guidance 15 kept
/// less for at most one more success in 9 (3 scenes), so guidance stays at 7.5.
pub static DEMO: FidelityTable = FidelityTable {
    name: "demo",
    source: "calibrated on the demo world",
    rows: [
        row(0.00, 16, 1.00, 7.5),
        row(0.25, 16, 1.00, 7.5),
        row(0.50, 128, 1.00, 7.5),
        row(0.75, 128, 0.90, 7.5),
        row(1.00, 128, 0.80, 7.5),
    ],
};

/// Every built-in table; a model names its own, else its family's applies.
pub static TABLES: [&FidelityTable; 3] = [&STABLE_DIFFUSION, &STABLE_DIFFUSION_XL, &DEMO];

impl FidelityTable {
    /// The built-in table called `name`.
    pub fn named(name: &str) -> Option<&'static FidelityTable> {
        TABLES.iter().copied().find(|t| t.name == name)
    }

    /// The parameters for `fidelity` (clamped to [0, 1]) given the snapshots that exist.
    pub fn parameters_for(&self, fidelity: f64, snapshots: &[usize]) -> EditParameters {
        let f = if fidelity.is_nan() {
            0.5
        } else {
            fidelity.clamp(0.0, 1.0)
        };
        let rows = &self.rows;
        let upper = rows
            .iter()
            .position(|(x, _)| *x >= f)
            .unwrap_or(rows.len() - 1)
            .max(1);
        let (x0, a) = rows[upper - 1];
        let (x1, b) = rows[upper];
        let s = (f - x0) / (x1 - x0);
        let nearest = if s < 0.5 { a } else { b };
        EditParameters {
            tune_steps: nearest_snapshot(nearest.tune_steps, snapshots),
            t0_fraction: a.t0_fraction + (b.t0_fraction - a.t0_fraction) * s,
            guidance_weight: a.guidance_weight + (b.guidance_weight - a.guidance_weight) * s,
        }
    }
}

/// The largest saved snapshot not above `wanted`, else the smallest saved one (monotone in
/// `wanted`). With no snapshots at all, 0 (no fine-tuning).
fn nearest_snapshot(wanted: usize, snapshots: &[usize]) -> usize {
    let mut sorted = snapshots.to_vec();
    sorted.sort_unstable();
    sorted
        .iter()
        .rev()
        .find(|s| **s <= wanted)
        .or(sorted.first())
        .copied()
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    const PAPER: [usize; 4] = [16, 32, 64, 128];

    #[test]
    fn table_rows_are_hit_exactly() {
        for table in TABLES {
            for (f, row) in table.rows {
                assert_eq!(table.parameters_for(f, &PAPER), row);
            }
            assert_eq!(FidelityTable::named(table.name), Some(table));
        }
        assert_eq!(FidelityTable::named("sdxl"), None);
    }

    #[test]
    fn higher_fidelity_never_means_fewer_steps_later_t0_or_stronger_guidance() {
        for (table, snapshots) in TABLES
            .iter()
            .flat_map(|t| [&PAPER[..], &[8, 100][..], &[64][..], &[][..]].map(|s| (t, s)))
        {
            let parameters_for = |f, s: &[usize]| table.parameters_for(f, s);
            let mut previous = parameters_for(0.0, snapshots);
            for i in 1..=1000 {
                let p = parameters_for(i as f64 / 1000.0, snapshots);
                assert!(
                    p.tune_steps >= previous.tune_steps,
                    "{p:?} after {previous:?}"
                );
                assert!(
                    p.t0_fraction <= previous.t0_fraction + 1e-12,
                    "{p:?} after {previous:?}"
                );
                assert!(
                    p.guidance_weight <= previous.guidance_weight + 1e-12,
                    "{p:?} after {previous:?}"
                );
                previous = p;
            }
        }
    }

    #[test]
    fn out_of_range_and_missing_snapshots_are_handled() {
        let parameters_for = |f, s: &[usize]| STABLE_DIFFUSION.parameters_for(f, s);
        assert_eq!(parameters_for(-3.0, &PAPER), parameters_for(0.0, &PAPER));
        assert_eq!(parameters_for(7.0, &PAPER), parameters_for(1.0, &PAPER));
        assert_eq!(parameters_for(1.0, &[10, 20]).tune_steps, 20);
        assert_eq!(parameters_for(0.0, &[]).tune_steps, 0);
    }
}
