//! LoRA files chosen to be applied to the base model (`--lora FILE[:WEIGHT]`). Nothing here
//! reads a tensor: the engine opens the file (see `engine::lora`).

use std::path::PathBuf;

/// The strongest weight a LoRA may be applied at: far beyond any use (-2 to 2 is usual), and
/// short of where its changes overflow the model's numbers into a black image.
pub const MAX_WEIGHT: f64 = 100.0;

/// One LoRA file and how strongly it applies (1 = as made).
#[derive(Debug, Clone, PartialEq)]
pub struct LoraChoice {
    pub path: PathBuf,
    pub weight: f64,
}

// The weight is never NaN (`parse` refuses non-finite weights), so equality is total.
impl Eq for LoraChoice {}

impl LoraChoice {
    /// `FILE` or `FILE:WEIGHT`. A suffix after the last `:` is a weight only when it is a
    /// number, so that `C:\loras\style.safetensors` stays a path.
    pub fn parse(text: &str) -> Result<Self, String> {
        let (path, weight) = match text.rsplit_once(':') {
            Some((path, weight)) => match weight.trim().parse::<f64>() {
                Ok(weight) => (path, weight),
                Err(_) => (text, 1.0),
            },
            None => (text, 1.0),
        };
        if path.trim().is_empty() {
            return Err(format!(
                "--lora {text} names no file; use --lora FILE[:WEIGHT]"
            ));
        }
        if !weight.is_finite() || weight.abs() > MAX_WEIGHT {
            return Err(format!(
                "--lora {text}: the weight must be a number between -{MAX_WEIGHT} and {MAX_WEIGHT} (LoRAs are applied at -2 to 2)"
            ));
        }
        Ok(Self {
            path: PathBuf::from(path),
            weight,
        })
    }

    /// The file's name, for recipes and listings.
    pub fn file_name(&self) -> String {
        self.path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| self.path.display().to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_file_with_and_without_a_weight() {
        let plain = LoraChoice::parse("style.safetensors").unwrap();
        assert_eq!(
            (plain.path, plain.weight),
            ("style.safetensors".into(), 1.0)
        );
        let weighted = LoraChoice::parse("dir/style.safetensors:0.8").unwrap();
        assert_eq!(
            (weighted.path, weighted.weight),
            ("dir/style.safetensors".into(), 0.8)
        );
        let windows = LoraChoice::parse(r"C:\loras\style.safetensors").unwrap();
        assert_eq!(windows.path, PathBuf::from(r"C:\loras\style.safetensors"));
        assert_eq!(
            LoraChoice::parse(r"C:\l\s.safetensors:-0.5")
                .unwrap()
                .weight,
            -0.5
        );
        assert!(LoraChoice::parse(":0.5").is_err());
        assert!(LoraChoice::parse("s.safetensors:inf").is_err());
        assert!(LoraChoice::parse("s.safetensors:nan").is_err());
        let huge = LoraChoice::parse("s.safetensors:1e15").unwrap_err();
        assert!(huge.contains("between -100 and 100"), "{huge}");
        assert_eq!(
            LoraChoice::parse("s.safetensors:-100").unwrap().weight,
            -100.0
        );
    }
}
