//! `unitune cache`: see what the snapshot cache holds, remove an entry, or clear it.

use std::time::{Duration, SystemTime};

use anyhow::Result;

use super::UsageError;
use super::args::{CacheAction, CacheArgs};
use crate::engine::finetune::{CacheEntry, DEFAULT_MAX_BYTES, SnapshotCache};

/// Characters of a key shown in listings: enough to name an entry.
const SHORT_KEY: usize = 12;

pub fn cache_command(args: &CacheArgs) -> Result<()> {
    let cache = SnapshotCache::new(SnapshotCache::default_dir().ok_or_else(|| {
        anyhow::anyhow!("this system has no user cache folder, so there is no snapshot cache")
    })?);
    match &args.action {
        None | Some(CacheAction::List) => list(&cache),
        Some(CacheAction::Remove { key }) => remove(&cache, key),
        Some(CacheAction::Clear) => {
            let (entries, bytes) = cache.clear()?;
            println!(
                "removed {entries} cache entr{} ({}) from {}",
                if entries == 1 { "y" } else { "ies" },
                human_bytes(bytes),
                cache.dir().display()
            );
            Ok(())
        }
    }
}

fn list(cache: &SnapshotCache) -> Result<()> {
    let mut entries = cache.entries();
    // Most recently used first: what people look for.
    entries.reverse();
    let total: u64 = entries.iter().map(|e| e.bytes).sum();
    println!(
        "snapshot cache {}: {} entr{}, {} (fine-tuning removes the least recently used beyond --cache-size, default {})",
        cache.dir().display(),
        entries.len(),
        if entries.len() == 1 { "y" } else { "ies" },
        human_bytes(total),
        human_bytes(DEFAULT_MAX_BYTES),
    );
    if entries.is_empty() {
        return Ok(());
    }
    println!(
        "{:<SHORT_KEY$}  {:>9}  {:<24}  {:<14}  PHOTO",
        "KEY", "SIZE", "SNAPSHOTS (STEPS)", "LAST USED"
    );
    let now = SystemTime::now();
    for entry in &entries {
        println!(
            "{:<SHORT_KEY$}  {:>9}  {:<24}  {:<14}  {}",
            short_key(&entry.key),
            human_bytes(entry.bytes),
            ladder(entry),
            age(now.duration_since(entry.last_used).unwrap_or_default()),
            entry
                .thumbnail
                .as_ref()
                .map_or("-".to_string(), |p| p.display().to_string()),
        );
    }
    Ok(())
}

fn remove(cache: &SnapshotCache, prefix: &str) -> Result<()> {
    let matches: Vec<CacheEntry> = cache
        .entries()
        .into_iter()
        .filter(|e| !prefix.is_empty() && e.key.starts_with(prefix))
        .collect();
    match matches.as_slice() {
        [entry] => {
            cache.remove(&entry.key)?;
            println!(
                "removed {} ({})",
                short_key(&entry.key),
                human_bytes(entry.bytes)
            );
            Ok(())
        }
        [] => Err(UsageError(format!(
            "no cache entry starts with {prefix:?}; `unitune cache` lists them"
        ))
        .into()),
        _ => Err(UsageError(format!(
            "{} cache entries start with {prefix:?}; give more of the key",
            matches.len()
        ))
        .into()),
    }
}

/// The start of a key (any folder in the cache is listed, so not necessarily ASCII).
fn short_key(key: &str) -> String {
    key.chars().take(SHORT_KEY).collect()
}

/// The snapshots an entry holds, and where a stopped fine-tune will continue.
fn ladder(entry: &CacheEntry) -> String {
    let steps: Vec<String> = entry.snapshot_steps.iter().map(|s| s.to_string()).collect();
    let mut text = if steps.is_empty() {
        "none".to_string()
    } else {
        steps.join(",")
    };
    if let Some(at) = entry.resumable_at {
        text.push_str(&format!(" (stopped at {at})"));
    }
    text
}

fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 4] = ["KB", "MB", "GB", "TB"];
    let mut value = bytes as f64;
    if value < 1000.0 {
        return format!("{bytes} B");
    }
    let mut unit = "";
    for u in UNITS {
        value /= 1000.0;
        unit = u;
        if value < 1000.0 {
            break;
        }
    }
    format!("{value:.1} {unit}")
}

fn age(elapsed: Duration) -> String {
    let minutes = elapsed.as_secs() / 60;
    match minutes {
        0 => "just now".into(),
        1..60 => format!("{minutes} min ago"),
        60..2880 => format!("{} h ago", minutes / 60),
        _ => format!("{} days ago", minutes / 1440),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_ages_read_naturally() {
        assert_eq!(human_bytes(999), "999 B");
        assert_eq!(human_bytes(4_100_000), "4.1 MB");
        assert_eq!(human_bytes(6_900_000_000), "6.9 GB");
        assert_eq!(age(Duration::from_secs(30)), "just now");
        assert_eq!(age(Duration::from_secs(5 * 60)), "5 min ago");
        assert_eq!(age(Duration::from_secs(3 * 3600)), "3 h ago");
        assert_eq!(age(Duration::from_secs(3 * 86400)), "3 days ago");
    }
}
