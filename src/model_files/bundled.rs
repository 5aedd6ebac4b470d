//! The CLIP tokenizer files that ship inside the program (`assets/clip-tokenizer/`, MIT, see
//! its README): a single-file checkpoint has no tokenizer, and `unitune bench` builds models
//! without a download. Every SD 1.x and 2.x model uses this vocabulary.

/// `(file name, contents)` of the bundled tokenizer, as a diffusers `tokenizer/` folder
/// holds them.
pub const BUNDLED_TOKENIZER: [(&str, &[u8]); 4] = [
    (
        "vocab.json",
        include_bytes!("../../assets/clip-tokenizer/vocab.json"),
    ),
    (
        "merges.txt",
        include_bytes!("../../assets/clip-tokenizer/merges.txt"),
    ),
    (
        "special_tokens_map.json",
        include_bytes!("../../assets/clip-tokenizer/special_tokens_map.json"),
    ),
    (
        "tokenizer_config.json",
        include_bytes!("../../assets/clip-tokenizer/tokenizer_config.json"),
    ),
];

/// The bundled vocabulary (`vocab.json`).
pub const BUNDLED_VOCAB: &[u8] = BUNDLED_TOKENIZER[0].1;
/// The bundled merges (`merges.txt`).
pub const BUNDLED_MERGES: &[u8] = BUNDLED_TOKENIZER[1].1;
