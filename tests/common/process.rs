//! tollgate as a real child process, for tests that kill it.

use std::process::Stdio;

use tollgate::config::Config;

/// `tollgate worker` as a real child process, with the test's configuration in a file of its own.
pub struct WorkerProcess {
    pub process: tokio::process::Child,
    dir: std::path::PathBuf,
}

impl WorkerProcess {
    pub fn start(config: &Config) -> Self {
        let dir = std::env::temp_dir().join(format!("tollgate-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let config_path = dir.join("tollgate.toml");
        std::fs::write(&config_path, toml::to_string(config).unwrap()).unwrap();
        let logs = std::env::var_os("TEST_LOG").is_some();
        let process = tokio::process::Command::new(env!("CARGO_BIN_EXE_tollgate"))
            .arg("worker")
            .arg("--config")
            .arg(&config_path)
            .stdout(Stdio::null())
            .stderr(if logs {
                Stdio::inherit()
            } else {
                Stdio::null()
            })
            .kill_on_drop(true)
            .spawn()
            .expect("worker process starts");
        Self { process, dir }
    }
}

impl Drop for WorkerProcess {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
