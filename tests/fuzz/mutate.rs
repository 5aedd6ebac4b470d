//! Mutations that keep enough of an input's structure to reach past its parser: JSON values
//! swapped for edge cases, PNG chunks with their checksums repaired, safetensors headers
//! edited as JSON, plus plain byte edits for everything else.

use rand::RngExt;
use rand_chacha::ChaCha8Rng;
use serde_json::Value;

/// Numbers that break arithmetic: zero, one, off-by-one, negative, huge, fractional.
const INTERESTING_NUMBERS: [f64; 16] = [
    0.0,
    1.0,
    2.0,
    3.0,
    -1.0,
    5.0,
    7.0,
    1000.0,
    65536.0,
    4294967296.0,
    1_099_511_627_776.0,
    1.8446744073709552e19,
    0.5,
    -0.0,
    1e-30,
    1e300,
];

const INTERESTING_U32: [u32; 8] = [0, 1, 0x7f, 0xff, 0xffff, 0x7fff_ffff, 0x8000_0000, u32::MAX];

/// 1 to 8 byte edits, some copying pieces of other seeds.
pub fn bytes(input: &[u8], seeds: &[Vec<u8>], rng: &mut ChaCha8Rng) -> Vec<u8> {
    let mut out = input.to_vec();
    let edits = 1 << rng.random_range(0..4);
    for _ in 0..edits {
        byte_edit(&mut out, seeds, rng);
    }
    out
}

fn byte_edit(out: &mut Vec<u8>, seeds: &[Vec<u8>], rng: &mut ChaCha8Rng) {
    if out.is_empty() {
        out.push(rng.random());
        return;
    }
    let at = rng.random_range(0..out.len());
    match rng.random_range(0..9) {
        0 => out[at] ^= 1 << rng.random_range(0..8),
        1 => out[at] = rng.random(),
        2 => out[at] = [0u8, 0xff, 0x7f, 0x80][rng.random_range(0..4)],
        3 => {
            let value = INTERESTING_U32[rng.random_range(0..INTERESTING_U32.len())];
            let bytes = if rng.random() {
                value.to_be_bytes()
            } else {
                value.to_le_bytes()
            };
            let end = (at + 4).min(out.len());
            out[at..end].copy_from_slice(&bytes[..end - at]);
        }
        4 => {
            let end = (at + rng.random_range(1..=64)).min(out.len());
            out.drain(at..end);
        }
        5 => {
            let end = (at + rng.random_range(1..=64)).min(out.len());
            let piece = out[at..end].to_vec();
            let to = rng.random_range(0..=out.len());
            out.splice(to..to, piece);
        }
        6 => {
            let count = rng.random_range(1..=16);
            let insert: Vec<u8> = (0..count).map(|_| rng.random()).collect();
            out.splice(at..at, insert);
        }
        7 => out.truncate(at),
        _ => {
            // Splice in a piece of another seed at the same offset.
            let other = &seeds[rng.random_range(0..seeds.len())];
            if at < other.len() {
                let end = (at + rng.random_range(1..=256)).min(other.len());
                let end_out = (at + (end - at)).min(out.len());
                out.splice(at..end_out, other[at..end].iter().copied());
            }
        }
    }
}

/// Byte edits, then (most of the time) every chunk's CRC recomputed so that the PNG decoder
/// reads the damaged chunk instead of stopping at its checksum.
pub fn png(input: &[u8], seeds: &[Vec<u8>], rng: &mut ChaCha8Rng) -> Vec<u8> {
    let mut out = bytes(input, seeds, rng);
    if rng.random_range(0..10) < 9 {
        fix_png_crcs(&mut out);
    }
    out
}

/// Images of any format: PNGs keep valid checksums, others get plain byte edits.
pub fn image(input: &[u8], seeds: &[Vec<u8>], rng: &mut ChaCha8Rng) -> Vec<u8> {
    if input.starts_with(b"\x89PNG") {
        png(input, seeds, rng)
    } else {
        bytes(input, seeds, rng)
    }
}

pub fn fix_png_crcs(data: &mut [u8]) {
    let mut at = 8;
    while at + 12 <= data.len() {
        let length = u32::from_be_bytes([data[at], data[at + 1], data[at + 2], data[at + 3]]);
        let end = at + 8 + length as usize;
        if end + 4 > data.len() {
            break;
        }
        let crc = crc32(&data[at + 4..end]);
        data[end..end + 4].copy_from_slice(&crc.to_be_bytes());
        at = end + 4;
    }
}

fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = u32::MAX;
    for &b in bytes {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// A JSON document with one to four values changed (most of the time), else byte edits.
pub fn json(input: &[u8], seeds: &[Vec<u8>], rng: &mut ChaCha8Rng) -> Vec<u8> {
    let Ok(mut value) = serde_json::from_slice::<Value>(input) else {
        return bytes(input, seeds, rng);
    };
    if rng.random_range(0..10) == 0 {
        return bytes(input, seeds, rng);
    }
    let dictionary = strings_of(seeds);
    for _ in 0..rng.random_range(1..=4) {
        mutate_value(&mut value, &dictionary, rng);
    }
    serde_json::to_vec_pretty(&value).expect("a JSON value serializes")
}

/// Every string in the seeds (keys and values): replacements that other parts of a config
/// accept, so a mutation can put a valid name in the wrong place.
fn strings_of(seeds: &[Vec<u8>]) -> Vec<String> {
    fn walk(value: &Value, out: &mut Vec<String>) {
        match value {
            Value::String(s) if s.len() < 64 => out.push(s.clone()),
            Value::Array(items) => items.iter().for_each(|v| walk(v, out)),
            Value::Object(map) => {
                for (k, v) in map {
                    out.push(k.clone());
                    walk(v, out);
                }
            }
            _ => {}
        }
    }
    let mut out = Vec::new();
    for seed in seeds {
        if let Ok(value) = serde_json::from_slice::<Value>(seed) {
            walk(&value, &mut out);
        }
    }
    out.sort();
    out.dedup();
    out
}

/// Changes one randomly chosen node of `root`.
fn mutate_value(root: &mut Value, dictionary: &[String], rng: &mut ChaCha8Rng) {
    let count = count_nodes(root);
    let target = rng.random_range(0..count);
    let mut index = 0;
    if let Some(node) = nth_node(root, target, &mut index) {
        edit_node(node, dictionary, rng);
    }
}

fn count_nodes(value: &Value) -> usize {
    1 + match value {
        Value::Array(items) => items.iter().map(count_nodes).sum(),
        Value::Object(map) => map.values().map(count_nodes).sum(),
        _ => 0,
    }
}

fn nth_node<'a>(value: &'a mut Value, target: usize, index: &mut usize) -> Option<&'a mut Value> {
    if *index == target {
        return Some(value);
    }
    *index += 1;
    match value {
        Value::Array(items) => items.iter_mut().find_map(|v| nth_node(v, target, index)),
        Value::Object(map) => map.values_mut().find_map(|v| nth_node(v, target, index)),
        _ => None,
    }
}

/// Whether `v` is written as an unsigned integer (configs read counts as integers).
fn is_whole_u64(v: f64) -> bool {
    v.fract() == 0.0 && (0.0..1.8e19).contains(&v)
}

fn interesting_number(rng: &mut ChaCha8Rng) -> Value {
    let n = INTERESTING_NUMBERS[rng.random_range(0..INTERESTING_NUMBERS.len())];
    if is_whole_u64(n) {
        Value::from(n as u64)
    } else if n.fract() == 0.0 && n < 0.0 {
        Value::from(n as i64)
    } else {
        Value::from(n)
    }
}

fn edit_node(node: &mut Value, dictionary: &[String], rng: &mut ChaCha8Rng) {
    let word = |rng: &mut ChaCha8Rng| {
        if dictionary.is_empty() {
            String::new()
        } else {
            dictionary[rng.random_range(0..dictionary.len())].clone()
        }
    };
    match node {
        Value::Number(n) => {
            *node = match rng.random_range(0..4) {
                0 => interesting_number(rng),
                // Nearby values: off by one, doubled, halved.
                1 => {
                    let v = n.as_f64().unwrap_or(0.0);
                    let options = [v + 1.0, v - 1.0, v * 2.0, (v / 2.0).floor(), v * 1000.0];
                    let v = options[rng.random_range(0..options.len())];
                    if is_whole_u64(v) {
                        Value::from(v as u64)
                    } else {
                        Value::from(v)
                    }
                }
                2 => Value::from(rng.random_range(0..128u64)),
                _ => {
                    let w = word(rng);
                    other_type(rng, w)
                }
            }
        }
        Value::String(s) => match rng.random_range(0..5) {
            0..=2 => *s = word(rng),
            3 => {
                let cut = rng.random_range(0..=s.len());
                let cut = (0..=cut)
                    .rev()
                    .find(|&c| s.is_char_boundary(c))
                    .unwrap_or(0);
                s.truncate(cut);
            }
            _ => {
                *node = {
                    let w = word(rng);
                    other_type(rng, w)
                }
            }
        },
        Value::Array(items) => match rng.random_range(0..6) {
            0 if !items.is_empty() => {
                let i = rng.random_range(0..items.len());
                items.remove(i);
            }
            1 if !items.is_empty() => {
                let i = rng.random_range(0..items.len());
                let copy = items[i].clone();
                items.insert(i, copy);
            }
            2 => items.clear(),
            3 => items.push(interesting_number(rng)),
            4 if !items.is_empty() => {
                let i = rng.random_range(0..items.len());
                items[i] = interesting_number(rng);
            }
            _ => {
                *node = {
                    let w = word(rng);
                    other_type(rng, w)
                }
            }
        },
        Value::Object(map) => match rng.random_range(0..4) {
            0 | 1 if !map.is_empty() => {
                let i = rng.random_range(0..map.len());
                let key = map.keys().nth(i).cloned().unwrap_or_default();
                map.remove(&key);
            }
            2 => {
                let value = {
                    let w = word(rng);
                    other_type(rng, w)
                };
                let key = word(rng);
                map.insert(key, value);
            }
            _ => {
                *node = {
                    let w = word(rng);
                    other_type(rng, w)
                }
            }
        },
        _ => {
            *node = {
                let w = word(rng);
                other_type(rng, w)
            }
        }
    }
}

fn other_type(rng: &mut ChaCha8Rng, word: String) -> Value {
    match rng.random_range(0..7) {
        0 => Value::Null,
        1 => Value::Bool(rng.random()),
        2 => Value::String(word),
        3 => Value::Array(vec![]),
        4 => Value::Object(Default::default()),
        5 => Value::Array(vec![interesting_number(rng), interesting_number(rng)]),
        _ => interesting_number(rng),
    }
}

/// A safetensors file with its header edited as JSON (shapes, dtypes, offsets), its header
/// bytes edited, its length prefix changed, or the file cut short.
pub fn safetensors(input: &[u8], seeds: &[Vec<u8>], rng: &mut ChaCha8Rng) -> Vec<u8> {
    let header = header_of(input);
    match (rng.random_range(0..10), header) {
        (0..=5, Some((value, rest))) => {
            let mut value = value;
            let dictionary = strings_of_headers(seeds);
            for _ in 0..rng.random_range(1..=3) {
                mutate_value(&mut value, &dictionary, rng);
            }
            with_header(&value, rest)
        }
        (6, _) if input.len() >= 8 => {
            let mut out = input.to_vec();
            let value = INTERESTING_U32[rng.random_range(0..INTERESTING_U32.len())];
            out[..8].copy_from_slice(&u64::from(value).to_le_bytes());
            out
        }
        (7, _) if !input.is_empty() => {
            let mut out = input.to_vec();
            out.truncate(rng.random_range(0..input.len()));
            out
        }
        _ => bytes(input, seeds, rng),
    }
}

/// The header as JSON and the data after it.
fn header_of(input: &[u8]) -> Option<(Value, &[u8])> {
    let length = u64::from_le_bytes(input.get(..8)?.try_into().ok()?) as usize;
    let header = input.get(8..8usize.checked_add(length)?)?;
    Some((serde_json::from_slice(header).ok()?, &input[8 + length..]))
}

fn with_header(header: &Value, data: &[u8]) -> Vec<u8> {
    let text = serde_json::to_vec(header).expect("a JSON value serializes");
    let mut out = (text.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&text);
    out.extend_from_slice(data);
    out
}

fn strings_of_headers(seeds: &[Vec<u8>]) -> Vec<String> {
    let headers: Vec<Vec<u8>> = seeds
        .iter()
        .filter_map(|s| header_of(s).map(|(v, _)| serde_json::to_vec(&v).unwrap_or_default()))
        .collect();
    let mut words = strings_of(&headers);
    words.extend(
        [
            "F16", "BF16", "F32", "F64", "I64", "I32", "U8", "BOOL", "F8_E4M3",
        ]
        .map(String::from),
    );
    words
}
