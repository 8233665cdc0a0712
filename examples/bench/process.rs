//! Herald as the benchmark runs it: the release `herald serve` binary in a child process,
//! so that its CPU and memory are its own and its peak RSS (VmHWM) is Herald's alone.

use std::{
    net::SocketAddr,
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::Context;

use super::run::Run;

/// The admin token of the benchmark's Herald.
pub const ADMIN_TOKEN: &str = "bench-admin-token";

/// A running `herald serve`.
pub struct Herald {
    child: Child,
    pub addr: SocketAddr,
}

impl Herald {
    /// Starts `herald serve --roles ROLES` against the run, with `env` added (Slack sink,
    /// routing file), logging to `log`; returns once `/health/live` answers.
    pub async fn start(
        run: &Run,
        roles: &str,
        env: &[(&str, String)],
        log: &PathBuf,
    ) -> anyhow::Result<Self> {
        let addr = free_port()?;
        let binary = std::env::current_exe()?
            .parent()
            .and_then(|examples| examples.parent())
            .map(|release| release.join("herald"))
            .context("no target directory")?;
        let log_file = std::fs::File::create(log)?;
        let child = Command::new(&binary)
            .args(["serve", "--roles", roles])
            .env("HERALD_DATABASE_URL", run.database_url())
            .env("HERALD_TOPIC_PREFIX", &run.settings.kafka.topic_prefix)
            .env("HERALD_REDIS_KEY_PREFIX", &run.settings.redis.key_prefix)
            .env("HERALD_HTTP_ADDR", addr.to_string())
            .env("HERALD_ADMIN_TOKEN", ADMIN_TOKEN)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or("warn".into()),
            )
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .with_context(|| format!("Failed to start {}", binary.display()))?;
        let herald = Herald { child, addr };
        let client = reqwest::Client::new();
        let started = Instant::now();
        loop {
            let live = client
                .get(format!("http://{addr}/health/live"))
                .send()
                .await;
            if live.is_ok_and(|r| r.status().is_success()) {
                return Ok(herald);
            }
            anyhow::ensure!(
                started.elapsed() < Duration::from_secs(60),
                "herald did not come up; see {}",
                log.display()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Peak resident set size so far (VmHWM), in bytes.
    pub fn peak_rss(&self) -> anyhow::Result<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))?;
        let kib: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .context("no VmHWM in /proc/<pid>/status")?;
        Ok(kib * 1024)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGTERM, then waits for a clean exit; returns the peak RSS it reached.
    pub async fn stop(mut self) -> anyhow::Result<u64> {
        let peak = self.peak_rss()?;
        Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()?;
        let started = Instant::now();
        while self.child.try_wait()?.is_none() {
            if started.elapsed() > Duration::from_secs(40) {
                self.child.kill()?;
                anyhow::bail!("herald did not stop within 40 s of SIGTERM");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(peak)
    }
}

impl Drop for Herald {
    /// A benchmark that fails half way does not leave Herald running.
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn free_port() -> anyhow::Result<SocketAddr> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?)
}
