//! Python clients of the tests, each in a virtualenv of the project directory with its pinned
//! requirements (installed on first run, and again whenever the requirements change): the
//! official OpenAI Python SDK (`.venv`, `tests/sdk/requirements.txt`) with a runner for the
//! scripts in `tests/sdk/`, and schemathesis (`.venv-schemathesis`).

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

/// The virtualenv's python, with the OpenAI SDK installed (`tests/sdk/requirements.txt`).
pub fn python_with_sdk() -> PathBuf {
    python_with(".venv", "tests/sdk/requirements.txt")
}

/// The python of the virtualenv `venv` (a directory of the project), with the pinned
/// `requirements` (a file of the project) installed. A lock file serialises concurrent test
/// runs; a copy of the requirements inside the venv marks a finished install.
pub fn python_with(venv: &str, requirements: &str) -> PathBuf {
    let project = project();
    let venv = project.join(venv);
    let python = venv.join("bin/python");
    let requirements = project.join(requirements);
    let wanted = fs::read_to_string(&requirements)
        .unwrap_or_else(|e| panic!("{}: {e}", requirements.display()));
    let marker = venv.join("tollgate-requirements.txt");
    let lock = fs::File::create(Path::new(env!("CARGO_TARGET_TMPDIR")).join("venv.lock"))
        .expect("lock file");
    lock.lock().expect("lock the venv");
    if fs::read_to_string(&marker).ok().as_deref() == Some(wanted.as_str()) && python.exists() {
        return python;
    }
    let python3 = which("python3").unwrap_or_else(|| {
        panic!(
            "python3 is needed for the Python clients of the tests: install it (Debian: apt-get install \
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
