//! The official OpenAI Python SDK as a test client: a virtualenv in the project directory with
//! the SDK pinned in `tests/sdk/requirements.txt` (installed on first run, and again whenever the
//! requirements change), and a runner for the scripts in `tests/sdk/`.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

pub fn project() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn run(command: &mut Command) {
    let status = command
        .status()
        .unwrap_or_else(|e| panic!("cannot run {command:?}: {e}"));
    assert!(status.success(), "{command:?} failed: {status}");
}

/// The virtualenv's python, with the pinned requirements installed. A lock file serialises
/// concurrent test runs; a copy of the requirements inside the venv marks a finished install.
pub fn python_with_sdk() -> PathBuf {
    let project = project();
    let venv = project.join(".venv");
    let python = venv.join("bin/python");
    let requirements = project.join("tests/sdk/requirements.txt");
    let wanted = fs::read_to_string(&requirements).expect("tests/sdk/requirements.txt");
    let marker = venv.join("tollgate-requirements.txt");
    let lock = fs::File::create(Path::new(env!("CARGO_TARGET_TMPDIR")).join("venv.lock"))
        .expect("lock file");
    lock.lock().expect("lock the venv");
    if fs::read_to_string(&marker).ok().as_deref() == Some(wanted.as_str()) && python.exists() {
        return python;
    }
    let python3 = which("python3").unwrap_or_else(|| {
        panic!(
            "python3 is needed for the OpenAI SDK test: install it (Debian: apt-get install \
             python3 python3-venv)"
        )
    });
    if !python.exists() {
        run(Command::new(python3).args(["-m", "venv"]).arg(&venv));
    }
    run(Command::new(&python)
        .args([
            "-m",
            "pip",
            "install",
            "-q",
            "--disable-pip-version-check",
            "-r",
        ])
        .arg(&requirements));
    fs::write(&marker, wanted).expect("write the venv marker");
    python
}

fn which(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join(program))
            .find(|p| Path::new(p).is_file())
    })
}

/// Runs a Python script with these environment variables (and no OpenAI ones of the caller's),
/// asserts it succeeded, and returns its standard output.
pub async fn run_python(python: &Path, script: &Path, vars: &[(&str, &str)]) -> String {
    let output = tokio::process::Command::new(python)
        .arg(script)
        .envs(vars.iter().copied())
        .env_remove("OPENAI_API_KEY")
        .env_remove("OPENAI_BASE_URL")
        .output()
        .await
        .expect("python runs");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr);
    println!("{stdout}");
    eprintln!("{stderr}");
    assert!(
        output.status.success(),
        "{} failed ({}):\n{stdout}\n{stderr}",
        script.display(),
        output.status
    );
    stdout
}
