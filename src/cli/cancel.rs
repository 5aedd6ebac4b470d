//! Ctrl-C, SIGTERM and SIGHUP (`kill`, `timeout`, `docker stop`, a session's logout): the
//! first asks the running job to stop at the end of its current step, keeping a fine-tune's
//! progress and its resume point (nothing half-written is left: exports and cache entries are
//! atomic); a second exits at once.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

#[derive(Debug, Clone, Default)]
pub struct CancelFlag(Arc<AtomicBool>);

impl CancelFlag {
    pub fn is_set(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }

    /// What an observer returns: stop once Ctrl-C was pressed.
    pub fn check(&self) -> std::ops::ControlFlow<()> {
        if self.is_set() {
            std::ops::ControlFlow::Break(())
        } else {
            std::ops::ControlFlow::Continue(())
        }
    }

    /// Installs the Ctrl-C handler (once per process).
    pub fn on_ctrl_c() -> Self {
        let flag = Self::default();
        let inner = flag.0.clone();
        let installed = ctrlc::set_handler(move || {
            if inner.swap(true, Ordering::SeqCst) {
                eprintln!("\nerror: interrupted");
                std::process::exit(super::EXIT_INTERRUPTED);
            }
            eprintln!("\nstopping after the current step (press Ctrl-C again to quit at once)");
        });
        if let Err(e) = installed {
            eprintln!("warning: Ctrl-C will quit at once ({e})");
        }
        flag
    }
}
