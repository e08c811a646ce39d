//! The deployment files held to the binary they deploy and to each other: `deploy/Dockerfile`,
//! `.dockerignore`, `deploy/compose.yaml`, `deploy/k8s/` and every YAML file under `deploy/`.
//!
//! Nothing here needs a Docker daemon, a cluster or the network. What can be checked without
//! them is: that every file parses; that names agree across files (services, labels, ports,
//! Secrets, ConfigMaps, mounted files, the binary's name); that every environment variable the
//! files set is one the binary reads (its name is looked up in `src/`, so renaming a variable
//! there fails this test until the files follow); that the configuration shipped in the
//! Kubernetes ConfigMap loads with tollgate's own `Config`; and that the binary starts as an
//! unprivileged user. `kubectl`, when it is on PATH, runs offline only: `kubectl kustomize`, then
//! `kubectl set ... --local`, which decodes every object into its Kubernetes type (a wrong type
//! or an unknown kind fails) and, for pod templates and Services, shows fields the type does not
//! know (they are dropped on the way through).

mod common;

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    io::Write,
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    time::{Duration, Instant},
};

use serde_json::{Map, Value};
use tollgate::config::{Config, ADMIN_KEY_MIN_BYTES};
use yaml_rust2::{Yaml, YamlLoader};

/// The UID (and GID) the image runs as; the Kubernetes manifests must ask for the same.
const IMAGE_UID: u32 = 10001;

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

#[test]
fn every_yaml_and_json_file_under_deploy_parses() {
    let mut problems = Problems::default();
    let mut seen = 0;
    for path in files_under(&repo().join("deploy")) {
        let text = fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let name = rel(&path);
        match path.extension().and_then(|e| e.to_str()) {
            Some("yaml" | "yml") => {
                seen += 1;
                if let Err(e) = yaml_docs(&text) {
                    problems.push(format!("{name}: {e}"));
                }
            }
            Some("json") => {
                if let Err(e) = serde_json::from_str::<Value>(&text) {
                    problems.push(format!("{name}: invalid JSON: {e}"));
                }
            }
            _ => {}
        }
    }
    problems.ensure(seen >= 6, || {
        format!("only {seen} YAML files under deploy/: compose.yaml and k8s/ are missing")
    });
    problems.assert_none("YAML and JSON under deploy/");
}

#[test]
fn dockerfile_builds_the_binary_and_runs_it_unprivileged() {
    let mut problems = Problems::default();
    let docker = Dockerfile::load();
    let cargo = CargoManifest::load();

    problems.ensure(docker.stages.len() >= 2, || {
        format!(
            "deploy/Dockerfile has {} stage(s): expected a build stage and a small runtime stage",
            docker.stages.len()
        )
    });
    let last = docker.stages.last().expect("deploy/Dockerfile has no FROM");

    // The final stage runs as a fixed numeric non-root user: Kubernetes' runAsNonRoot can only
    // verify a numeric one.
    match last.last("USER") {
        None => problems.push("the final stage has no USER: the image would run as root".into()),
        Some(user) => {
            let (uid, gid) = user.split_once(':').unwrap_or((user, ""));
            problems.ensure(uid.parse::<u32>().is_ok_and(|u| u != 0), || {
                format!("USER {user}: the user must be numeric and not 0")
            });
            problems.ensure(uid.parse() == Ok(IMAGE_UID), || {
                format!("USER {user}: expected {IMAGE_UID}, the UID the manifests ask for")
            });
            problems.ensure(
                gid.is_empty() || gid.parse::<u32>().is_ok_and(|g| g != 0),
                || format!("USER {user}: the group must be numeric and not 0"),
            );
        }
    }

    // The binary: built in a builder stage by `cargo build --release --locked`, copied into the
    // final stage, and the entrypoint.
    let bins = cargo.binaries();
    let copy = last
        .copies()
        .into_iter()
        .find(|c| c.from.is_some())
        .expect("the final stage copies nothing from a build stage");
    let from = copy.from.clone().unwrap();
    let builder = docker
        .stages
        .iter()
        .find(|s| s.name.as_deref() == Some(&from));
    problems.ensure(builder.is_some(), || {
        format!("COPY --from={from}: no stage is named {from}")
    });
    let copied_bin = copy
        .sources
        .first()
        .and_then(|s| s.rsplit('/').next())
        .unwrap_or("")
        .to_string();
    problems.ensure(bins.contains(&copied_bin), || {
        format!("the final stage copies {copied_bin:?} from {from}, but Cargo.toml builds {bins:?}")
    });
    if let Some(builder) = builder {
        let runs = builder.all("RUN").join("\n");
        let build = runs.lines().find(|l| l.contains("cargo build"));
        match build {
            None => problems.push(format!("stage {from} never runs cargo build")),
            Some(line) => {
                for flag in ["--release", "--locked"] {
                    problems.ensure(line.split_whitespace().any(|w| w == flag), || {
                        format!("stage {from}: cargo build without {flag}")
                    });
                }
            }
        }
        problems.ensure(
            runs.contains(&format!("target/release/{copied_bin}")),
            || format!("stage {from} never takes target/release/{copied_bin} from the build"),
        );
    }
    let installed = if copy.dest.ends_with('/') {
        format!("{}{copied_bin}", copy.dest)
    } else {
        copy.dest.clone()
    };
    let entrypoint = last.exec_form("ENTRYPOINT");
    problems.ensure(entrypoint.first() == Some(&installed), || {
        format!("ENTRYPOINT {entrypoint:?} does not run {installed}, where the binary is copied")
    });

    // The health check asks /healthz, through a script the image holds.
    match last.last("HEALTHCHECK") {
        None => problems.push("the final stage has no HEALTHCHECK".into()),
        Some(check) if check.trim().eq_ignore_ascii_case("NONE") => {
            problems.push("HEALTHCHECK NONE".into())
        }
        Some(check) => {
            let command = check.split_once("CMD").map(|(_, c)| c.trim()).unwrap_or("");
            let script = last
                .heredoc_copies()
                .into_iter()
                .find(|(dest, _)| command.contains(dest.as_str()))
                .map(|(_, body)| {
                    // What the script does, not what its comments say.
                    body.lines()
                        .filter(|l| !l.trim_start().starts_with('#'))
                        .collect::<Vec<_>>()
                        .join("\n")
                });
            problems.ensure(
                command.contains("/healthz") || script.is_some_and(|s| s.contains("/healthz")),
                || format!("HEALTHCHECK {check:?} does not ask /healthz"),
            );
        }
    }

    // The listen addresses: every interface, unprivileged ports, both exposed.
    let env = last.env();
    let exposed: BTreeSet<u16> = last
        .all("EXPOSE")
        .iter()
        .flat_map(|e| e.split_whitespace())
        .filter_map(|p| p.split('/').next()?.parse().ok())
        .collect();
    for var in ["TOLLGATE_LISTEN", "TOLLGATE_WORKER_LISTEN"] {
        match env.get(var) {
            None => problems.push(format!("the image does not set {var}")),
            Some(listen) => {
                problems.ensure(listen.starts_with("0.0.0.0:"), || {
                    format!("{var}={listen}: a container must listen on 0.0.0.0")
                });
                let port = port_of(listen);
                problems.ensure(port.is_some_and(|p| p >= 1024), || {
                    format!("{var}={listen}: a port below 1024 needs root or a capability")
                });
                problems.ensure(port.is_some_and(|p| exposed.contains(&p)), || {
                    format!("{var}={listen}: the port is not in EXPOSE {exposed:?}")
                });
            }
        }
    }
    let src = Source::load();
    for name in env.keys() {
        problems.ensure(src.reads_env(name, &BTreeSet::new()), || {
            format!("deploy/Dockerfile sets ENV {name}, which tollgate never reads (src/)")
        });
    }

    // Every file the build copies from the context exists and is not left out by .dockerignore;
    // every target Cargo.toml declares by name is copied (Cargo refuses a manifest whose
    // declared targets are missing), and so are the migrations sqlx::migrate! embeds.
    let ignore = DockerIgnore::load();
    let mut copied = Vec::new();
    for stage in &docker.stages {
        for copy in stage.copies().into_iter().filter(|c| c.from.is_none()) {
            for source in &copy.sources {
                let source = source.trim_start_matches("./").trim_end_matches('/');
                problems.ensure(repo().join(source).exists(), || {
                    format!("COPY {source}: no such file or directory in the build context")
                });
                // Every file under it, as a pattern may leave out files in a directory.
                let path = repo().join(source);
                let files = if path.is_dir() {
                    files_under(&path)
                } else {
                    vec![path]
                };
                for file in files.iter().map(|f| rel(f)) {
                    problems.ensure(!ignore.excludes(&file), || {
                        format!(
                            "COPY {source}: .dockerignore leaves {file} out of the build context"
                        )
                    });
                }
                copied.push(source.to_string());
            }
        }
    }
    let mut needed = cargo.declared_target_paths();
    needed.extend(["Cargo.toml".to_string(), "Cargo.lock".to_string()]);
    needed.push("src/lib.rs".into());
    if src.text.contains("sqlx::migrate!()") {
        needed.push("migrations".into());
    }
    for path in needed {
        problems.ensure(
            copied
                .iter()
                .any(|c| path == *c || path.starts_with(&format!("{c}/"))),
            || format!("the build needs {path}, which no COPY brings into the image"),
        );
    }

    problems.assert_none("deploy/Dockerfile");
}

#[test]
fn dockerignore_keeps_the_context_small() {
    let ignore = DockerIgnore::load();
    let mut problems = Problems::default();
    for heavy in ["target", ".git", ".venv", "target/release/tollgate"] {
        problems.ensure(ignore.excludes(heavy), || {
            format!(".dockerignore does not leave out {heavy}")
        });
    }
    problems.assert_none(".dockerignore");
}

#[test]
fn compose_file_wires_the_services_together() {
    let mut problems = Problems::default();
    let compose = &yaml_file("deploy/compose.yaml")[0];
    let services = compose["services"]
        .as_object()
        .expect("compose.yaml has no services");
    let service = |name: &str| &compose["services"][name];
    let docker = Dockerfile::load();
    let image_env = docker.stages.last().unwrap().env();
    let src = Source::load();
    let defaults = Config::default();

    for name in ["postgres", "rabbitmq", "migrate", "front", "worker"] {
        problems.ensure(services.contains_key(name), || format!("no service {name}"));
    }

    // depends_on names existing services, with conditions that can be met.
    for (name, service) in services {
        for (dep, condition) in depends_on(service) {
            match services.get(&dep) {
                None => problems.push(format!("{name} depends on {dep}, which is no service")),
                Some(target) => match condition.as_str() {
                    "service_started" => {}
                    "service_healthy" => problems.ensure(
                        target.get("healthcheck").is_some() || builds_from_dockerfile(target),
                        || {
                            format!(
                                "{name} waits for {dep} to be healthy; {dep} has no healthcheck"
                            )
                        },
                    ),
                    "service_completed_successfully" => problems
                        .ensure(target["restart"].as_str() == Some("no"), || {
                            format!("{name} waits for {dep} to complete, but {dep} is restarted")
                        }),
                    other => problems.push(format!("{name}: unknown depends_on condition {other}")),
                },
            }
        }
    }

    // One image, one build for the front, the worker and the migration; the build is the
    // Dockerfile in deploy/, from the repository root.
    let (front, worker, migrate) = (service("front"), service("worker"), service("migrate"));
    for (name, service) in [("worker", worker), ("migrate", migrate)] {
        problems.ensure(service.get("image") == front.get("image"), || {
            format!("{name} and front use different images")
        });
        problems.ensure(service.get("build") == front.get("build"), || {
            format!("{name} and front are built differently")
        });
    }
    problems.ensure(builds_from_dockerfile(front), || {
        "front is not built from deploy/Dockerfile with the repository root as context".into()
    });
    let commands = [
        ("migrate", "migrate"),
        ("front", "serve"),
        ("worker", "worker"),
    ];
    for (name, expected) in commands {
        let command = words(&service(name)["command"]);
        problems.ensure(
            command.first().map(String::as_str) == Some(expected),
            || format!("{name} runs {command:?}, expected tollgate {expected}"),
        );
    }
    problems.ensure(migrate["restart"].as_str() == Some("no"), || {
        "migrate must not be restarted: it runs once".into()
    });
    for (name, service) in [("front", front), ("worker", worker)] {
        problems.ensure(
            depends_on(service).contains(&(
                "migrate".to_string(),
                "service_completed_successfully".to_string(),
            )),
            || format!("{name} does not wait for migrate to complete successfully"),
        );
    }
    problems.ensure(
        depends_on(migrate)
            .iter()
            .any(|(d, c)| d == "postgres" && c == "service_healthy"),
        || "migrate does not wait for postgres to be healthy".into(),
    );

    // The environment of the services running tollgate: names the binary reads, hosts that are
    // services, listen ports that are published or scraped.
    let tollgate_services: Vec<&String> = services
        .iter()
        .filter(|(_, s)| s.get("image") == front.get("image"))
        .map(|(n, _)| n)
        .collect();
    let mut listen_ports = BTreeMap::new();
    for name in &tollgate_services {
        let service = &compose["services"][name.as_str()];
        let env = environment(service);
        for var in env.keys() {
            problems.ensure(src.reads_env(var, &BTreeSet::new()), || {
                format!("{name} sets {var}, which tollgate never reads (src/)")
            });
        }
        for var in ["DATABASE_URL", "AMQP_URL"] {
            let Some(value) = env.get(var) else {
                problems.push(format!("{name} does not set {var}"));
                continue;
            };
            for url in value.split(',') {
                match url::Url::parse(url.trim()) {
                    Err(e) => problems.push(format!("{name}: {var}={url}: {e}")),
                    Ok(url) => {
                        let host = url.host_str().unwrap_or("");
                        problems.ensure(services.contains_key(host), || {
                            format!("{name}: {var} points at {host}, which is no service")
                        });
                    }
                }
            }
        }
        let command = words(&service["command"]);
        let listen_var = match command.first().map(String::as_str) {
            Some("serve") => "TOLLGATE_LISTEN",
            Some("worker") => "TOLLGATE_WORKER_LISTEN",
            _ => continue,
        };
        let listen = env
            .get(listen_var)
            .or(image_env.get(listen_var))
            .cloned()
            .unwrap_or_default();
        problems.ensure(listen.starts_with("0.0.0.0:"), || {
            format!("{name}: {listen_var}={listen:?}, other containers cannot reach it")
        });
        if let Some(port) = port_of(&listen) {
            listen_ports.insert(name.to_string(), port);
        }
    }
    let front_port = listen_ports.get("front").copied();
    problems.ensure(
        front_port.is_some_and(|p| published_ports(front).contains(&p)),
        || format!("front listens on {front_port:?}, which is not published"),
    );

    // Enough time to stop: past the grace tollgate gives running work on SIGTERM (compose runs
    // them without a config file, so with the defaults).
    let graces = [
        ("front", defaults.server.shutdown_grace_seconds),
        ("worker", defaults.worker.shutdown_grace_seconds),
    ];
    for (name, grace) in graces {
        let period = service(name)["stop_grace_period"]
            .as_str()
            .and_then(seconds)
            .unwrap_or(10.0);
        problems.ensure(period > grace as f64, || {
            format!(
                "{name}: stop_grace_period {period} s does not exceed the {grace} s tollgate \
                 gives running work on SIGTERM: the rest is killed"
            )
        });
    }

    // Every file the services mount exists, and the mounts include RabbitMQ's definitions.
    let mut mounts_by_service = BTreeMap::new();
    for (name, service) in services {
        let mounts = bind_mounts(service);
        for (source, target) in &mounts {
            problems.ensure(repo().join("deploy").join(source).exists(), || {
                format!("{name} mounts deploy/{source} at {target}: no such file")
            });
        }
        mounts_by_service.insert(name.clone(), mounts);
    }
    let all_sources: Vec<PathBuf> = mounts_by_service
        .values()
        .flatten()
        .map(|(s, _)| normalize(&Path::new("deploy").join(s)))
        .collect();
    let expected_mounts = [
        "deploy/rabbitmq-definitions.json",
        "deploy/prometheus/prometheus.yml",
        "deploy/prometheus/alerts.yml",
        "deploy/grafana/tollgate-dashboard.json",
        "deploy/grafana/provisioning",
    ];
    for expected in expected_mounts {
        problems.ensure(all_sources.contains(&PathBuf::from(expected)), || {
            format!("no service mounts {expected}")
        });
    }
    for (name, service) in services {
        for (config, target) in config_mounts(service) {
            match &compose["configs"][&config] {
                Value::Null => problems.push(format!("{name} uses config {config}: not defined")),
                def => {
                    if let Some(file) = def["file"].as_str() {
                        problems.ensure(repo().join("deploy").join(file).exists(), || {
                            format!("config {config}: deploy/{file} does not exist")
                        });
                    }
                    problems.ensure(
                        def.get("file").is_some() || def.get("content").is_some(),
                        || format!("config {config} (mounted at {target}) has no file nor content"),
                    );
                }
            }
        }
    }

    check_rabbitmq(compose, &mounts_by_service, &mut problems);
    check_monitoring(compose, &mounts_by_service, &listen_ports, &mut problems);
    problems.assert_none("deploy/compose.yaml");
}

#[test]
fn kubernetes_manifests_are_consistent() {
    let mut problems = Problems::default();
    let k8s = K8s::load();
    let src = Source::load();

    for (file, doc) in &k8s.docs {
        for field in ["/apiVersion", "/kind", "/metadata/name"] {
            problems.ensure(
                doc.pointer(field)
                    .and_then(Value::as_str)
                    .is_some_and(|v| !v.is_empty()),
                || format!("{file}: a document without {field}"),
            );
        }
        // The API versions Kubernetes serves today (the older ones were removed in 1.25/1.26).
        let kind = doc["kind"].as_str().unwrap_or("");
        let expected = match kind {
            "Deployment" => "apps/v1",
            "Job" => "batch/v1",
            "PodDisruptionBudget" => "policy/v1",
            "HorizontalPodAutoscaler" => "autoscaling/v2",
            "ConfigMap" | "Secret" | "Service" | "ServiceAccount" => "v1",
            _ => "(a kind this test does not know yet: add its API version here)",
        };
        problems.ensure(doc["apiVersion"].as_str() == Some(expected), || {
            format!("{file}: {kind} {} is not {expected}", doc["apiVersion"])
        });
        problems.ensure(doc.pointer("/metadata/namespace").is_none(), || {
            format!(
                "{file}: {} names a namespace; the manifests are applied to any",
                k8s.id(doc)
            )
        });
    }

    // The kustomization lists every manifest but the examples, and only existing files.
    let kustomization = &yaml_file("deploy/k8s/kustomization.yaml")[0];
    let listed: BTreeSet<String> = kustomization["resources"]
        .as_array()
        .map(|r| {
            r.iter()
                .filter_map(|v| v.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default();
    let manifests: BTreeSet<String> = k8s
        .files
        .iter()
        .filter(|f| *f != "kustomization.yaml" && !f.ends_with(".example.yaml"))
        .cloned()
        .collect();
    problems.ensure(listed == manifests, || {
        format!("kustomization.yaml lists {listed:?}; the manifests are {manifests:?}")
    });
    let images: BTreeSet<&str> = kustomization["images"]
        .as_array()
        .map(|i| i.iter().filter_map(|v| v["name"].as_str()).collect())
        .unwrap_or_default();

    // The configuration file every workload reads, loaded with tollgate's own Config.
    let mut config: Option<Config> = None;
    let mut api_key_envs = BTreeSet::new();
    for workload in k8s.workloads() {
        for container in workload.containers() {
            let Some(path) = env_value(container, "TOLLGATE_CONFIG") else {
                continue;
            };
            match k8s.mounted_file(&workload, container, path) {
                Err(e) => problems.push(format!("{}: TOLLGATE_CONFIG={path}: {e}", workload.id)),
                Ok(text) => match toml::from_str::<Config>(&text) {
                    Err(e) => problems.push(format!("{}: {path} does not load: {e}", workload.id)),
                    Ok(loaded) => {
                        if let Err(e) = loaded.validate() {
                            problems.push(format!("{}: {path} is refused: {e}", workload.id));
                        }
                        api_key_envs
                            .extend(loaded.models.iter().filter_map(|m| m.api_key_env.clone()));
                        config = Some(loaded);
                    }
                },
            }
        }
    }
    let config = config.expect("no workload sets TOLLGATE_CONFIG to a mounted ConfigMap file");

    let mut image_names = BTreeSet::new();
    for workload in k8s.workloads() {
        let id = &workload.id;
        let pod = workload.pod;
        problems.ensure(
            pod["securityContext"]["runAsNonRoot"] == Value::Bool(true),
            || format!("{id}: the pod does not set runAsNonRoot: true"),
        );
        problems.ensure(pod["securityContext"]["runAsUser"] == IMAGE_UID, || {
            format!("{id}: runAsUser is not {IMAGE_UID}, the image's USER")
        });
        let volumes: BTreeMap<&str, &Value> = array(&pod["volumes"])
            .iter()
            .filter_map(|v| Some((v["name"].as_str()?, v)))
            .collect();
        for volume in volumes.values() {
            if let Some(name) = volume["configMap"]["name"].as_str() {
                k8s.check_ref(
                    id,
                    "ConfigMap",
                    name,
                    &keys_of(&volume["configMap"]),
                    false,
                    &mut problems,
                );
            }
            if let Some(name) = volume["secret"]["secretName"].as_str() {
                k8s.check_ref(
                    id,
                    "Secret",
                    name,
                    &keys_of(&volume["secret"]),
                    false,
                    &mut problems,
                );
            }
        }
        for container in workload.containers() {
            let cname = container["name"].as_str().unwrap_or("?");
            let what = format!("{id}, container {cname}");
            if let Some(image) = container["image"].as_str() {
                image_names.insert(image.to_string());
            }

            let sc = &container["securityContext"];
            problems.ensure(sc["readOnlyRootFilesystem"] == Value::Bool(true), || {
                format!("{what}: readOnlyRootFilesystem is not true")
            });
            problems.ensure(sc["allowPrivilegeEscalation"] == Value::Bool(false), || {
                format!("{what}: allowPrivilegeEscalation is not false")
            });
            problems.ensure(
                array(&sc["capabilities"]["drop"]).contains(&Value::from("ALL")),
                || format!("{what}: capabilities do not drop ALL"),
            );

            for kind in ["cpu", "memory"] {
                let request = container["resources"]["requests"][kind]
                    .as_str()
                    .and_then(quantity);
                let limit = container["resources"]["limits"][kind]
                    .as_str()
                    .and_then(quantity);
                match (request, limit) {
                    (Some(r), Some(l)) => problems.ensure(r <= l, || {
                        format!("{what}: the {kind} request is above its limit")
                    }),
                    _ => problems.push(format!(
                        "{what}: no {kind} request and limit (or unreadable)"
                    )),
                }
            }

            for env in array(&container["env"]) {
                let name = env["name"].as_str().unwrap_or("");
                problems.ensure(src.reads_env(name, &api_key_envs), || {
                    format!(
                        "{what}: sets {name}, which tollgate never reads (src/) and no model's \
                         api_key_env names"
                    )
                });
                for (kind, field) in [("Secret", "secretKeyRef"), ("ConfigMap", "configMapKeyRef")]
                {
                    let reference = &env["valueFrom"][field];
                    if let Some(object) = reference["name"].as_str() {
                        let key = reference["key"].as_str().unwrap_or("").to_string();
                        let optional = reference["optional"] == Value::Bool(true);
                        k8s.check_ref(&what, kind, object, &[key], optional, &mut problems);
                    }
                }
            }
            for source in array(&container["envFrom"]) {
                for (kind, field) in [("Secret", "secretRef"), ("ConfigMap", "configMapRef")] {
                    if let Some(object) = source[field]["name"].as_str() {
                        k8s.check_ref(&what, kind, object, &[], false, &mut problems);
                        let prefix = source["prefix"].as_str().unwrap_or("");
                        for key in k8s.data_keys(kind, object) {
                            let name = format!("{prefix}{key}");
                            problems.ensure(src.reads_env(&name, &api_key_envs), || {
                                format!("{what}: envFrom {kind} {object} sets {name}, never read")
                            });
                        }
                    }
                }
            }
            for mount in array(&container["volumeMounts"]) {
                let name = mount["name"].as_str().unwrap_or("");
                problems.ensure(volumes.contains_key(name), || {
                    format!("{what}: mounts volume {name}, which the pod does not have")
                });
            }
            if let Some(path) = env_value(container, "TOLLGATE_ADMIN_KEY_FILE") {
                // The example's placeholder must be refused (too short), never used as a key.
                match k8s.mounted_file(&workload, container, path) {
                    Err(e) => problems.push(format!("{what}: TOLLGATE_ADMIN_KEY_FILE={path}: {e}")),
                    Ok(key) => problems.ensure(key.trim().len() < ADMIN_KEY_MIN_BYTES, || {
                        format!(
                            "{what}: the example admin key is {} bytes: a placeholder tollgate \
                             accepts opens the admin API with a published key",
                            key.trim().len()
                        )
                    }),
                }
            }

            // The listen addresses: every interface, on a port the container declares.
            let ports = declared_ports(container);
            for var in ["TOLLGATE_LISTEN", "TOLLGATE_WORKER_LISTEN"] {
                if let Some(listen) = env_value(container, var) {
                    problems.ensure(listen.starts_with("0.0.0.0:"), || {
                        format!("{what}: {var}={listen}: the kubelet and Services cannot reach it")
                    });
                    let declared = port_of(listen).is_some_and(|p| ports.values().any(|v| *v == p));
                    problems.ensure(declared, || {
                        format!("{what}: {var}={listen}: no such container port ({ports:?})")
                    });
                }
            }
        }
    }
    problems.ensure(image_names.len() == 1, || {
        format!("the workloads run different images: {image_names:?}")
    });
    for image in &image_names {
        problems.ensure(images.contains(image.as_str()), || {
            format!("kustomization.yaml's images do not set {image}, the workloads' image")
        });
    }

    // The three roles, each with the command, probes and grace it needs.
    let mut roles = BTreeMap::new();
    for workload in k8s.workloads() {
        for container in workload.containers() {
            let args = words(&container["args"]);
            if let Some(role) = args.first() {
                roles
                    .entry(role.clone())
                    .or_insert_with(Vec::new)
                    .push(workload.id.clone());
            }
        }
    }
    for (role, kind) in [
        ("serve", "Deployment"),
        ("worker", "Deployment"),
        ("migrate", "Job"),
    ] {
        let ids = roles.get(role).cloned().unwrap_or_default();
        problems.ensure(ids.len() == 1 && ids[0].starts_with(kind), || {
            format!("expected one {kind} running tollgate {role}, found {ids:?}")
        });
    }
    for workload in k8s
        .workloads()
        .into_iter()
        .filter(|w| w.kind == "Deployment")
    {
        let id = &workload.id;
        let labels = &workload.doc["spec"]["template"]["metadata"]["labels"];
        let selector = &workload.doc["spec"]["selector"]["matchLabels"];
        problems.ensure(!is_empty(selector) && subset(selector, labels), || {
            format!("{id}: the selector does not match the pod template's labels")
        });
        for constraint in array(&workload.pod["topologySpreadConstraints"]) {
            problems.ensure(
                subset(&constraint["labelSelector"]["matchLabels"], labels),
                || format!("{id}: a topology spread constraint selects other pods than its own"),
            );
        }
        for container in workload.containers() {
            let role = words(&container["args"])
                .first()
                .cloned()
                .unwrap_or_default();
            let listen_var = if role == "worker" {
                "TOLLGATE_WORKER_LISTEN"
            } else {
                "TOLLGATE_LISTEN"
            };
            let server_port = env_value(container, listen_var).and_then(port_of);
            let ports = declared_ports(container);
            let probes = [
                ("livenessProbe", "/healthz", true),
                ("readinessProbe", "/readyz", true),
                ("startupProbe", "/healthz", false),
            ];
            for (probe, path, required) in probes {
                let get = &container[probe]["httpGet"];
                if get.is_null() {
                    problems.ensure(!required, || format!("{id}: no {probe} (httpGet)"));
                    continue;
                }
                problems.ensure(get["path"].as_str() == Some(path), || {
                    format!("{id}: {probe} asks {:?}, expected {path}", get["path"])
                });
                let port = match &get["port"] {
                    Value::String(name) => ports.get(name).copied(),
                    other => other.as_u64().and_then(|p| u16::try_from(p).ok()),
                };
                problems.ensure(
                    port.is_some_and(|p| ports.values().any(|v| *v == p)),
                    || {
                        format!(
                            "{id}: {probe} port {} is not a port the container declares",
                            get["port"]
                        )
                    },
                );
                problems.ensure(port.is_some() && port == server_port, || {
                    format!(
                        "{id}: {probe} probes port {port:?}, but tollgate {role} serves \
                         /healthz on {server_port:?} ({listen_var})"
                    )
                });
            }
        }
    }

    let grace = |id: &str| {
        k8s.by_id(id)
            .and_then(|d| d["spec"]["template"]["spec"]["terminationGracePeriodSeconds"].as_u64())
            .unwrap_or(30)
    };
    if let Some([front]) = roles.get("serve").map(Vec::as_slice) {
        let doc = k8s.by_id(front).unwrap();
        problems.ensure(
            doc["spec"]["replicas"].as_u64().is_some_and(|r| r >= 2),
            || format!("{front}: fewer than 2 replicas"),
        );
        let pre_stop = words(
            &doc["spec"]["template"]["spec"]["containers"][0]["lifecycle"]["preStop"]["exec"]
                ["command"],
        );
        let pause = if pre_stop.first().map(String::as_str) == Some("sleep") {
            pre_stop
                .get(1)
                .and_then(|s| s.parse::<u64>().ok())
                .unwrap_or(0)
        } else {
            0
        };
        let needed = config.server.shutdown_grace_seconds + pause;
        problems.ensure(grace(front) > needed, || {
            format!(
                "{front}: terminationGracePeriodSeconds {} does not exceed \
                 server.shutdown_grace_seconds + preStop ({needed} s)",
                grace(front)
            )
        });
    }
    if let Some([worker]) = roles.get("worker").map(Vec::as_slice) {
        let needed = config.worker.shutdown_grace_seconds + 10;
        problems.ensure(grace(worker) >= needed, || {
            format!(
                "{worker}: terminationGracePeriodSeconds {} leaves running jobs less than \
                 worker.shutdown_grace_seconds + 10 s ({needed} s) to finish or be handed back",
                grace(worker)
            )
        });
    }
    if let Some([job]) = roles.get("migrate").map(Vec::as_slice) {
        let policy = k8s.by_id(job).unwrap()["spec"]["template"]["spec"]["restartPolicy"]
            .as_str()
            .unwrap_or("");
        problems.ensure(policy == "Never" || policy == "OnFailure", || {
            format!("{job}: restartPolicy {policy:?}")
        });
    }

    // Services, disruption budgets and the autoscaler select what exists.
    let deployments: Vec<&Value> = k8s.of_kind("Deployment");
    let matching = |selector: &Value| -> Vec<&Value> {
        deployments
            .iter()
            .copied()
            .filter(|d| {
                !is_empty(selector)
                    && subset(selector, &d["spec"]["template"]["metadata"]["labels"])
            })
            .collect()
    };
    for service in k8s.of_kind("Service") {
        let id = k8s.id(service);
        let selected = matching(&service["spec"]["selector"]);
        problems.ensure(selected.len() == 1, || {
            format!(
                "{id} selects {} Deployments' pods, expected one",
                selected.len()
            )
        });
        if let Some(deployment) = selected.first() {
            let ports: BTreeMap<String, u16> =
                array(&deployment["spec"]["template"]["spec"]["containers"])
                    .iter()
                    .flat_map(declared_ports)
                    .collect();
            for port in array(&service["spec"]["ports"]) {
                let target = if port["targetPort"].is_null() {
                    &port["port"]
                } else {
                    &port["targetPort"]
                };
                let found = match target {
                    Value::String(name) => ports.contains_key(name),
                    other => other
                        .as_u64()
                        .is_some_and(|p| ports.values().any(|v| u64::from(*v) == p)),
                };
                problems.ensure(found, || {
                    format!(
                        "{id}: targetPort {target} is not a port of {}",
                        k8s.id(deployment)
                    )
                });
            }
        }
    }
    let hpas = k8s.of_kind("HorizontalPodAutoscaler");
    for pdb in k8s.of_kind("PodDisruptionBudget") {
        let id = k8s.id(pdb);
        let selected = matching(&pdb["spec"]["selector"]["matchLabels"]);
        problems.ensure(selected.len() == 1, || {
            format!(
                "{id} selects {} Deployments' pods, expected one",
                selected.len()
            )
        });
        let spec = &pdb["spec"];
        problems.ensure(
            spec.get("minAvailable").is_some() != spec.get("maxUnavailable").is_some(),
            || format!("{id}: set exactly one of minAvailable and maxUnavailable"),
        );
        if let (Some(deployment), Some(min)) = (selected.first(), spec["minAvailable"].as_u64()) {
            let name = deployment["metadata"]["name"].as_str().unwrap_or("");
            let replicas = hpas
                .iter()
                .find(|h| h["spec"]["scaleTargetRef"]["name"].as_str() == Some(name))
                .map(|h| h["spec"]["minReplicas"].as_u64().unwrap_or(1))
                .or(deployment["spec"]["replicas"].as_u64())
                .unwrap_or(1);
            problems.ensure(min < replicas, || {
                format!("{id}: minAvailable {min} with {replicas} replicas blocks every eviction")
            });
        }
    }
    for hpa in &hpas {
        let id = k8s.id(hpa);
        let target = &hpa["spec"]["scaleTargetRef"];
        let name = target["name"].as_str().unwrap_or("");
        let deployment = deployments
            .iter()
            .find(|d| d["metadata"]["name"].as_str() == Some(name));
        problems.ensure(
            target["kind"].as_str() == Some("Deployment")
                && target["apiVersion"].as_str() == Some("apps/v1")
                && deployment.is_some(),
            || format!("{id} scales {target}, which is no Deployment here"),
        );
        if let Some(deployment) = deployment {
            problems.ensure(deployment["spec"].get("replicas").is_none(), || {
                format!(
                    "{id}: Deployment {name} sets replicas, which each apply resets under the HPA"
                )
            });
            for container in array(&deployment["spec"]["template"]["spec"]["containers"]) {
                problems.ensure(!container["resources"]["requests"]["cpu"].is_null(), || {
                    format!("{id}: CPU utilization needs a CPU request on {name}")
                });
            }
        }
        let (min, max) = (
            hpa["spec"]["minReplicas"].as_u64().unwrap_or(1),
            hpa["spec"]["maxReplicas"].as_u64().unwrap_or(0),
        );
        problems.ensure(1 <= min && min <= max, || {
            format!("{id}: minReplicas {min}, maxReplicas {max}")
        });
        let metrics = array(&hpa["spec"]["metrics"]);
        let resource_only = metrics
            .iter()
            .all(|m| m["type"].as_str() == Some("Resource"));
        problems.ensure(!metrics.is_empty() && resource_only, || {
            format!("{id}: the default metrics must be Resource metrics (no metrics adapter)")
        });
    }
    // The queue-depth alternative, commented out in worker.yaml, names a metric tollgate exports
    // and the queue the workers consume.
    let worker_yaml = read("deploy/k8s/worker.yaml");
    problems.ensure(worker_yaml.contains("# - type: External"), || {
        "worker.yaml: the commented External (queue depth) metric is gone".into()
    });
    let metric = "tollgate_queue_messages";
    problems.ensure(
        worker_yaml.contains(metric) && src.text.contains(&format!("\"{metric}\"")),
        || format!("worker.yaml's queue-depth alternative uses {metric}, not exported (src/)"),
    );
    let queue = &Config::default().amqp.queue;
    problems.ensure(worker_yaml.contains(&format!("queue: {queue}")), || {
        format!("worker.yaml's queue-depth alternative does not select queue {queue}")
    });

    problems.assert_none("deploy/k8s/");
}

#[test]
fn kubectl_decodes_every_manifest_offline() {
    let Some(kubectl) = find_on_path("kubectl") else {
        loud(
            "\n!!!! SKIPPED: kubectl is not on PATH, so the manifests were NOT decoded into their \
             Kubernetes types. The other checks in tests/deploy.rs still ran. Install kubectl \
             to run this check. !!!!\n",
        );
        return;
    };
    let dir = repo().join("deploy/k8s");
    let kustomized = kubectl_run(&kubectl, &["kustomize", &dir.to_string_lossy()], None);
    assert!(
        kustomized.status.success(),
        "kubectl kustomize deploy/k8s failed:\n{}",
        String::from_utf8_lossy(&kustomized.stderr)
    );
    let built = String::from_utf8(kustomized.stdout).unwrap();
    let mut texts: Vec<String> = split_docs(&built);
    let k8s = K8s::load();
    for file in k8s.files.iter().filter(|f| f.ends_with(".example.yaml")) {
        texts.extend(split_docs(&read(&format!("deploy/k8s/{file}"))));
    }
    let objects: Vec<Value> = texts.iter().flat_map(|t| yaml_docs(t).unwrap()).collect();
    let expected = k8s.docs.len();
    assert_eq!(
        objects.len(),
        expected,
        "kustomize built {} objects from {expected} documents",
        objects.len()
    );

    // Every object decoded into its Kubernetes type: a field of the wrong type, or a kind or
    // apiVersion kubectl does not know, fails here. `set env` then refuses what has no pod
    // template, which is expected; anything else it says is a problem.
    let all = texts.join("---\n");
    let decoded = kubectl_run(
        &kubectl,
        &[
            "set",
            "env",
            "--local",
            "-o",
            "json",
            "-f",
            "-",
            "TOLLGATE_DEPLOY_CHECK=1",
        ],
        Some(&all),
    );
    let stderr = String::from_utf8_lossy(&decoded.stderr);
    let refusals = stderr
        .matches("the object is not a pod or does not have a pod template")
        .count();
    let unexpected: Vec<&str> = stderr
        .split("error: ")
        .map(str::trim)
        .filter(|e| {
            !e.is_empty() && !e.contains("the object is not a pod or does not have a pod template")
        })
        .collect();
    assert!(
        unexpected.is_empty(),
        "kubectl could not decode the manifests:\n{}",
        unexpected.join("\n")
    );
    let with_pods = json_stream(&decoded.stdout);
    assert_eq!(
        with_pods.len() + refusals,
        objects.len(),
        "kubectl accounted for {} of {} objects:\n{stderr}",
        with_pods.len() + refusals,
        objects.len()
    );

    // A field the type does not know is dropped on the way through: every field of the
    // original must come back.
    let mut problems = Problems::default();
    let mut round_tripped = with_pods;
    for (service, text) in objects
        .iter()
        .zip(&texts)
        .filter(|(o, _)| o["kind"] == "Service")
    {
        let selector = service["spec"]["selector"]
            .as_object()
            .map(|m| {
                m.iter()
                    .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or("")))
                    .collect::<Vec<_>>()
                    .join(",")
            })
            .unwrap_or_default();
        let out = kubectl_run(
            &kubectl,
            &[
                "set", "selector", "--local", "-o", "json", "-f", "-", &selector,
            ],
            Some(text),
        );
        if out.status.success() {
            round_tripped.extend(json_stream(&out.stdout));
        } else {
            problems.push(format!(
                "kubectl set selector on {}: {}",
                k8s.id(service),
                String::from_utf8_lossy(&out.stderr)
            ));
        }
    }
    for decoded in &round_tripped {
        let original = objects
            .iter()
            .find(|o| {
                o["kind"] == decoded["kind"] && o["metadata"]["name"] == decoded["metadata"]["name"]
            })
            .unwrap_or_else(|| {
                panic!(
                    "kubectl returned {} that is not in the manifests",
                    k8s.id(decoded)
                )
            });
        let mut lost = Vec::new();
        missing_fields(original, decoded, String::new(), &mut lost);
        problems.ensure(lost.is_empty(), || {
            format!(
                "{}: fields Kubernetes does not know (misspelled or misplaced?): {lost:?}",
                k8s.id(original)
            )
        });
    }
    problems.ensure(round_tripped.len() >= 5, || {
        format!(
            "only {} objects came back from kubectl",
            round_tripped.len()
        )
    });
    problems.assert_none("kubectl");
}

/// kubectl's decoding drops unknown fields silently where it cannot show them (ConfigMaps,
/// Secrets, disruption budgets, autoscalers); kubernetes-validate (PyPI), when installed, holds
/// every object to the strict OpenAPI schema, offline.
#[test]
fn manifests_pass_the_strict_kubernetes_schemas() {
    let Some(kubectl) = find_on_path("kubectl") else {
        eprintln!(
            "\nnote: kubectl is not on PATH, so the manifests were not checked against the \
             strict Kubernetes schemas.\n",
        );
        return;
    };
    // kubernetes-validate, pinned, in a virtualenv of the project (made on first run).
    let python = common::sdk::python_with(".venv-k8s", "tests/deploy/requirements.txt");
    let validate = python.with_file_name("kubernetes-validate");
    let dir = repo().join("deploy/k8s");
    let kustomized = kubectl_run(&kubectl, &["kustomize", &dir.to_string_lossy()], None);
    assert!(
        kustomized.status.success(),
        "kubectl kustomize deploy/k8s failed"
    );
    let built = std::env::temp_dir().join(format!("tollgate-k8s-{}.yaml", std::process::id()));
    fs::write(&built, &kustomized.stdout).unwrap();
    let _cleanup = RemoveOnDrop(built.clone());
    let mut command = Command::new(validate);
    command.args(["--strict", "--quiet"]).arg(&built);
    for file in K8s::load()
        .files
        .iter()
        .filter(|f| f.ends_with(".example.yaml"))
    {
        command.arg(dir.join(file));
    }
    let out = output_within(command, Duration::from_secs(60));
    assert!(
        out.status.success(),
        "kubernetes-validate --strict:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn the_binary_runs_as_an_unprivileged_user() {
    // No privileged port by default: binding one would need root or CAP_NET_BIND_SERVICE.
    let listen = Config::default().server.listen;
    assert!(
        port_of(&listen).is_some_and(|p| p >= 1024),
        "the default listen address {listen} needs a privileged port"
    );

    let uid = current_uid().expect("cannot read this process's UID from /proc/self/status");
    let setpriv = find_on_path("setpriv");
    let wrapper: Vec<String> = match (uid, &setpriv) {
        (0, Some(setpriv)) => vec![
            setpriv.to_string_lossy().into_owned(),
            format!("--reuid={IMAGE_UID}"),
            format!("--regid={IMAGE_UID}"),
            "--clear-groups".into(),
            "--no-new-privs".into(),
            "--".into(),
        ],
        (0, None) => {
            loud(
                "\n!!!! SKIPPED: running as root and setpriv (util-linux) is not on PATH, so the \
                 binary could NOT be run as an unprivileged user. !!!!\n",
            );
            return;
        }
        _ => Vec::new(),
    };
    let run_as = if uid == 0 { IMAGE_UID } else { uid };

    // A directory the unprivileged user can read but not write, as on a read-only root
    // filesystem: the binary and the Kubernetes configuration are copied in, and it is the
    // working directory and HOME.
    let dir = std::env::temp_dir().join(format!("tollgate-deploy-test-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).unwrap();
    let bin = dir.join("tollgate");
    fs::copy(env!("CARGO_BIN_EXE_tollgate"), &bin).unwrap();
    let config = dir.join("tollgate.toml");
    fs::write(&config, K8s::load().config_text()).unwrap();
    set_mode(&bin, 0o555);
    set_mode(&config, 0o444);
    set_mode(&dir, 0o555);
    let _cleanup = RemoveOnDrop(dir.clone());

    let run = |args: &[&str]| -> Output {
        let mut command = Command::new(
            wrapper
                .first()
                .map(String::as_str)
                .unwrap_or(bin.to_str().unwrap()),
        );
        if !wrapper.is_empty() {
            command.args(&wrapper[1..]).arg(&bin);
        }
        command
            .args(args)
            .env_clear()
            .env("PATH", "/usr/bin:/bin")
            .env("HOME", &dir)
            .env("TOLLGATE_CONFIG", &config)
            .env("TOLLGATE_LISTEN", "0.0.0.0:8080")
            .env("TOLLGATE_WORKER_LISTEN", "0.0.0.0:9091")
            .env("RUST_LOG", "info")
            // Port 1: nothing listens there, so the connection is refused at once.
            .env("DATABASE_URL", "postgres://tollgate@127.0.0.1:1/tollgate")
            .env("AMQP_URL", "amqp://tollgate:tollgate@127.0.0.1:1/%2f")
            .current_dir(&dir)
            .stdin(Stdio::null());
        output_within(command, Duration::from_secs(30))
    };

    // The same wrapper really changes the user (else the rest proves nothing).
    if !wrapper.is_empty() {
        let mut id = Command::new(&wrapper[0]);
        id.args(&wrapper[1..])
            .args(["id", "-u"])
            .env("PATH", "/usr/bin:/bin");
        let out = output_within(id, Duration::from_secs(5));
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            IMAGE_UID.to_string(),
            "setpriv did not switch the user"
        );
    }

    let version = run(&["--version"]);
    let stdout = String::from_utf8_lossy(&version.stdout);
    assert!(
        version.status.success() && stdout.contains(env!("CARGO_PKG_VERSION")),
        "tollgate --version as UID {run_as}: {:?}\n{stdout}\n{}",
        version.status,
        String::from_utf8_lossy(&version.stderr)
    );

    // `migrate` loads the Kubernetes configuration and goes as far as connecting to
    // PostgreSQL, which is not there: it must say so and exit non-zero, and nothing on the way
    // may need root or a writable directory.
    let migrate = run(&["migrate"]);
    let stderr = String::from_utf8_lossy(&migrate.stderr);
    assert!(
        !migrate.status.success(),
        "tollgate migrate succeeded without a database:\n{stderr}"
    );
    assert!(
        stderr.contains("127.0.0.1:1"),
        "tollgate migrate as UID {run_as} did not fail on the database connection:\n{stderr}"
    );
    for sign in [
        "Permission denied",
        "Read-only file system",
        "Operation not permitted",
        "invalid config",
    ] {
        assert!(
            !stderr.contains(sign),
            "tollgate migrate as UID {run_as}: {sign}:\n{stderr}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Compose: reading services
// ---------------------------------------------------------------------------------------------

/// RabbitMQ loads tollgate's definitions at boot, and the user tollgate connects as exists.
fn check_rabbitmq(
    compose: &Value,
    mounts: &BTreeMap<String, Vec<(String, String)>>,
    problems: &mut Problems,
) {
    let rabbitmq = &compose["services"]["rabbitmq"];
    problems.ensure(
        rabbitmq["image"]
            .as_str()
            .is_some_and(|i| i.contains("management")),
        || "the rabbitmq image has no management plugin (use a *-management tag)".into(),
    );
    let mounted = mounts.get("rabbitmq").map(Vec::as_slice).unwrap_or(&[]);
    let conf = mounted.iter().find(|(s, t)| {
        s.ends_with(".conf")
            && (t.starts_with("/etc/rabbitmq/conf.d/") || t == "/etc/rabbitmq/rabbitmq.conf")
    });
    let Some((conf_source, _)) = conf else {
        problems.push("rabbitmq mounts no .conf into /etc/rabbitmq/conf.d/".into());
        return;
    };
    let conf_text = read(&format!("deploy/{conf_source}"));
    let Some(definitions) = conf_text.lines().find_map(|l| {
        let (key, value) = l.split_once('=')?;
        (key.trim() == "load_definitions").then(|| value.trim().to_string())
    }) else {
        problems.push(format!(
            "deploy/{conf_source} does not set load_definitions"
        ));
        return;
    };
    // load_definitions names a file, or a directory whose files are imported in name order.
    let topology = mounted.iter().find(|(s, _)| {
        normalize(&Path::new("deploy").join(s)) == Path::new("deploy/rabbitmq-definitions.json")
    });
    let Some((_, topology_target)) = topology else {
        problems.push("rabbitmq does not mount deploy/rabbitmq-definitions.json".into());
        return;
    };
    if *topology_target == definitions {
        return;
    }
    let in_dir = |target: &str| {
        Path::new(target).parent() == Some(Path::new(&definitions)) && target.ends_with(".json")
    };
    problems.ensure(in_dir(topology_target), || {
        format!("the definitions are mounted at {topology_target}; RabbitMQ loads {definitions}")
    });
    // With definitions to import RabbitMQ creates no default user: one must come with them, and
    // it must be the one in AMQP_URL.
    let amqp_url = environment(&compose["services"]["front"])
        .get("AMQP_URL")
        .cloned()
        .unwrap_or_default();
    let url = url::Url::parse(amqp_url.split(',').next().unwrap_or("")).expect("AMQP_URL");
    let vhost = percent_decode(url.path().trim_start_matches('/'));
    let vhost = if vhost.is_empty() {
        "/".to_string()
    } else {
        vhost
    };
    let mut user_found = false;
    let mut users_target = None;
    for (config, target) in config_mounts(rabbitmq) {
        if !in_dir(&target) {
            continue;
        }
        let def = &compose["configs"][&config];
        let text = match (def["content"].as_str(), def["file"].as_str()) {
            (Some(content), _) => content.to_string(),
            (None, Some(file)) => read(&format!("deploy/{file}")),
            _ => continue,
        };
        let json: Value = match serde_json::from_str(&text) {
            Ok(json) => json,
            Err(e) => {
                problems.push(format!("config {config}: invalid JSON: {e}"));
                continue;
            }
        };
        for user in array(&json["users"]) {
            if user["name"].as_str() == Some(url.username()) {
                user_found = true;
                users_target = Some(target.clone());
                problems.ensure(user["password"].as_str() == url.password(), || {
                    format!(
                        "config {config}: the password of {} is not the one in AMQP_URL",
                        url.username()
                    )
                });
                problems.ensure(
                    array(&json["permissions"])
                        .iter()
                        .any(|p| p["user"] == user["name"] && p["vhost"].as_str() == Some(&vhost)),
                    || {
                        format!(
                            "config {config}: {} has no permissions on vhost {vhost}",
                            url.username()
                        )
                    },
                );
            }
        }
    }
    problems.ensure(user_found, || {
        format!(
            "no definitions file in {definitions} creates {}, the user of AMQP_URL",
            url.username()
        )
    });
    if let Some(users) = users_target {
        problems.ensure(users < *topology_target, || {
            format!("{users} (the user) sorts after {topology_target} (the topology)")
        });
    }
}

/// Prometheus scrapes the services where they listen and loads its rules where they are
/// mounted; Grafana finds the dashboard where it is mounted and Prometheus by service name.
fn check_monitoring(
    compose: &Value,
    mounts: &BTreeMap<String, Vec<(String, String)>>,
    listen_ports: &BTreeMap<String, u16>,
    problems: &mut Problems,
) {
    let services = compose["services"].as_object().unwrap();
    let service = |name: &str| &compose["services"][name];
    for name in ["prometheus", "grafana"] {
        problems.ensure(
            array(&service(name)["profiles"]).contains(&Value::from("monitoring")),
            || format!("{name} is not in the monitoring profile"),
        );
    }
    for name in ["postgres", "rabbitmq", "migrate", "front", "worker"] {
        problems.ensure(service(name).get("profiles").is_none(), || {
            format!("{name} is in a profile: a plain `docker compose up` would not start it")
        });
    }
    let mounted = |service: &str| mounts.get(service).map(Vec::as_slice).unwrap_or(&[]);
    let target_of = |service: &str, source: &str| {
        mounted(service)
            .iter()
            .find(|(s, _)| normalize(&Path::new("deploy").join(s)) == Path::new(source))
            .map(|(_, t)| t.clone())
    };
    if repo().join("deploy/prometheus/prometheus.yml").exists() {
        let prometheus = &yaml_file("deploy/prometheus/prometheus.yml")[0];
        let config_target = target_of("prometheus", "deploy/prometheus/prometheus.yml");
        problems.ensure(
            config_target.as_deref() == Some("/etc/prometheus/prometheus.yml"),
            || {
                format!(
                    "prometheus.yml is mounted at {config_target:?}, not where Prometheus reads it"
                )
            },
        );
        for rule in array(&prometheus["rule_files"])
            .iter()
            .filter_map(Value::as_str)
        {
            let expected = Path::new("/etc/prometheus").join(rule);
            problems.ensure(
                mounted("prometheus")
                    .iter()
                    .any(|(_, t)| Path::new(t) == expected),
                || {
                    format!(
                        "prometheus.yml loads {rule}, but nothing is mounted at {}",
                        expected.display()
                    )
                },
            );
        }
        for job in array(&prometheus["scrape_configs"]) {
            for group in array(&job["static_configs"]) {
                for target in array(&group["targets"]).iter().filter_map(Value::as_str) {
                    let (host, port) = target.rsplit_once(':').unwrap_or((target, ""));
                    problems.ensure(services.contains_key(host), || {
                        format!("prometheus.yml scrapes {target}: {host} is no service")
                    });
                    if let Some(listen) = listen_ports.get(host) {
                        problems.ensure(port.parse() == Ok(*listen), || {
                            format!(
                                "prometheus.yml scrapes {target}, but {host} listens on {listen}"
                            )
                        });
                    }
                }
            }
        }
    }
    let provisioning = repo().join("deploy/grafana/provisioning");
    if provisioning.exists() {
        let target = target_of("grafana", "deploy/grafana/provisioning");
        problems.ensure(
            target.as_deref() == Some("/etc/grafana/provisioning"),
            || format!("grafana/provisioning is mounted at {target:?}, not where Grafana reads it"),
        );
        for file in files_under(&provisioning) {
            let doc = &yaml_file(&rel(&file))[0];
            for provider in array(&doc["providers"]) {
                let path = provider["options"]["path"].as_str().unwrap_or("");
                problems.ensure(
                    mounted("grafana").iter().any(|(s, t)| {
                        s.ends_with(".json") && Path::new(t).parent() == Some(Path::new(path))
                    }),
                    || {
                        format!(
                            "{}: dashboards are read from {path}, where no dashboard is mounted",
                            rel(&file)
                        )
                    },
                );
            }
            for source in array(&doc["datasources"]) {
                if let Some(Ok(url)) = source["url"].as_str().map(url::Url::parse) {
                    let host = url.host_str().unwrap_or("");
                    problems.ensure(services.contains_key(host), || {
                        format!("{}: datasource {url} is no service", rel(&file))
                    });
                }
            }
        }
    }
}

/// `depends_on` as (service, condition) pairs, from its list or map form.
fn depends_on(service: &Value) -> Vec<(String, String)> {
    match &service["depends_on"] {
        Value::Array(names) => names
            .iter()
            .filter_map(|n| Some((n.as_str()?.to_string(), "service_started".to_string())))
            .collect(),
        Value::Object(map) => map
            .iter()
            .map(|(name, dep)| {
                let condition = dep["condition"].as_str().unwrap_or("service_started");
                (name.clone(), condition.to_string())
            })
            .collect(),
        _ => Vec::new(),
    }
}

/// A service's environment, from its map or `KEY=value` list form.
fn environment(service: &Value) -> BTreeMap<String, String> {
    let text = |v: &Value| match v {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    };
    match &service["environment"] {
        Value::Object(map) => map.iter().map(|(k, v)| (k.clone(), text(v))).collect(),
        Value::Array(items) => items
            .iter()
            .filter_map(|i| {
                let (k, v) = i.as_str()?.split_once('=').unwrap_or((i.as_str()?, ""));
                Some((k.to_string(), v.to_string()))
            })
            .collect(),
        _ => BTreeMap::new(),
    }
}

/// Whether a service is built from deploy/Dockerfile with the repository root as context.
fn builds_from_dockerfile(service: &Value) -> bool {
    let Some(context) = service["build"]["context"].as_str() else {
        return false;
    };
    let dockerfile = service["build"]["dockerfile"]
        .as_str()
        .unwrap_or("Dockerfile");
    normalize(&Path::new("deploy").join(context)) == Path::new("")
        && normalize(&Path::new("deploy").join(context).join(dockerfile))
            == Path::new("deploy/Dockerfile")
}

/// The files and directories a service bind-mounts, as (source relative to deploy/, target).
fn bind_mounts(service: &Value) -> Vec<(String, String)> {
    array(&service["volumes"])
        .iter()
        .filter_map(|v| match v {
            Value::String(short) => {
                let mut parts = short.splitn(3, ':');
                let (source, target) = (parts.next()?, parts.next()?);
                let bind = source.starts_with('.') || source.starts_with('/');
                bind.then(|| (source.to_string(), target.to_string()))
            }
            Value::Object(long) if long.get("type")?.as_str()? == "bind" => Some((
                long.get("source")?.as_str()?.to_string(),
                long.get("target")?.as_str()?.to_string(),
            )),
            _ => None,
        })
        .collect()
}

/// The compose configs a service mounts, as (config name, target).
fn config_mounts(service: &Value) -> Vec<(String, String)> {
    array(&service["configs"])
        .iter()
        .filter_map(|c| match c {
            Value::String(name) => Some((name.clone(), format!("/{name}"))),
            Value::Object(long) => {
                let source = long.get("source")?.as_str()?.to_string();
                let target = long.get("target").and_then(Value::as_str).map(String::from);
                Some((source.clone(), target.unwrap_or(format!("/{source}"))))
            }
            _ => None,
        })
        .collect()
}

/// The container ports a service publishes.
fn published_ports(service: &Value) -> Vec<u16> {
    array(&service["ports"])
        .iter()
        .filter_map(|p| match p {
            Value::String(short) => short.rsplit(':').next()?.split('/').next()?.parse().ok(),
            Value::Number(n) => n.as_u64().and_then(|n| u16::try_from(n).ok()),
            Value::Object(long) => long
                .get("target")?
                .as_u64()
                .and_then(|n| u16::try_from(n).ok()),
            _ => None,
        })
        .collect()
}

/// A compose duration (`45s`, `1m30s`, `500ms`) in seconds.
fn seconds(text: &str) -> Option<f64> {
    let mut total = 0.0;
    let mut number = String::new();
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if c.is_ascii_digit() || c == '.' {
            number.push(c);
            continue;
        }
        let value: f64 = number.parse().ok()?;
        number.clear();
        total += match c {
            'h' => value * 3600.0,
            'm' if chars.peek() == Some(&'s') => {
                chars.next();
                value / 1000.0
            }
            'm' => value * 60.0,
            's' => value,
            _ => return None,
        };
    }
    number.is_empty().then_some(total)
}

// ---------------------------------------------------------------------------------------------
// Kubernetes: reading objects
// ---------------------------------------------------------------------------------------------

struct K8s {
    /// The YAML files of deploy/k8s/, by name.
    files: Vec<String>,
    /// Every object, with the file it is in.
    docs: Vec<(String, Value)>,
}

/// A Deployment or Job, with its pod spec.
struct Workload<'a> {
    id: String,
    kind: String,
    doc: &'a Value,
    pod: &'a Value,
}

impl Workload<'_> {
    fn containers(&self) -> Vec<&Value> {
        array(&self.pod["containers"]).iter().collect()
    }
}

impl K8s {
    fn load() -> Self {
        let dir = repo().join("deploy/k8s");
        let mut files: Vec<String> = fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter(|f| f.ends_with(".yaml") || f.ends_with(".yml"))
            .collect();
        files.sort();
        // kustomization.yaml configures kustomize; it is no object of the cluster.
        let docs = files
            .iter()
            .filter(|f| *f != "kustomization.yaml")
            .flat_map(|f| {
                yaml_file(&format!("deploy/k8s/{f}"))
                    .into_iter()
                    .map(move |d| (f.clone(), d))
            })
            .collect();
        K8s { files, docs }
    }

    fn id(&self, doc: &Value) -> String {
        format!(
            "{}/{}",
            doc["kind"].as_str().unwrap_or("?"),
            doc["metadata"]["name"].as_str().unwrap_or("?")
        )
    }

    fn by_id(&self, id: &str) -> Option<&Value> {
        self.docs.iter().map(|(_, d)| d).find(|d| self.id(d) == id)
    }

    fn of_kind(&self, kind: &str) -> Vec<&Value> {
        self.docs
            .iter()
            .map(|(_, d)| d)
            .filter(|d| d["kind"].as_str() == Some(kind))
            .collect()
    }

    fn workloads(&self) -> Vec<Workload<'_>> {
        self.docs
            .iter()
            .map(|(_, d)| d)
            .filter(|d| matches!(d["kind"].as_str(), Some("Deployment" | "Job")))
            .map(|d| Workload {
                id: self.id(d),
                kind: d["kind"].as_str().unwrap().to_string(),
                doc: d,
                pod: &d["spec"]["template"]["spec"],
            })
            .collect()
    }

    /// The keys of a Secret's or ConfigMap's data.
    fn data_keys(&self, kind: &str, name: &str) -> Vec<String> {
        self.of_kind(kind)
            .into_iter()
            .filter(|d| d["metadata"]["name"].as_str() == Some(name))
            .flat_map(|d| {
                ["data", "stringData", "binaryData"]
                    .into_iter()
                    .filter_map(|f| d[f].as_object())
                    .flat_map(|m| m.keys().cloned())
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    /// A reference to a Secret or ConfigMap (and to keys in it) resolves, unless optional.
    fn check_ref(
        &self,
        from: &str,
        kind: &str,
        name: &str,
        keys: &[String],
        optional: bool,
        problems: &mut Problems,
    ) {
        let exists = self
            .of_kind(kind)
            .iter()
            .any(|d| d["metadata"]["name"].as_str() == Some(name));
        problems.ensure(exists, || {
            format!("{from} refers to {kind} {name}, which no file in deploy/k8s/ defines")
        });
        if !exists || optional {
            return;
        }
        let present = self.data_keys(kind, name);
        for key in keys.iter().filter(|k| !k.is_empty()) {
            problems.ensure(present.contains(key), || {
                format!("{from} reads key {key} of {kind} {name}, which has {present:?}")
            });
        }
    }

    /// The content of the file at `path` in a container, from the ConfigMap or Secret volume
    /// mounted over it.
    fn mounted_file(
        &self,
        workload: &Workload,
        container: &Value,
        path: &str,
    ) -> Result<String, String> {
        let path = Path::new(path);
        let mount = array(&container["volumeMounts"])
            .iter()
            .find(|m| {
                m["mountPath"]
                    .as_str()
                    .is_some_and(|p| path.parent() == Some(Path::new(p)))
            })
            .ok_or("no volume is mounted on its directory")?;
        let name = mount["name"].as_str().unwrap_or("");
        let volume = array(&workload.pod["volumes"])
            .iter()
            .find(|v| v["name"].as_str() == Some(name))
            .ok_or(format!("the pod has no volume {name}"))?;
        let file = path.file_name().unwrap().to_string_lossy().to_string();
        let (kind, object, source) = if let Some(object) = volume["configMap"]["name"].as_str() {
            ("ConfigMap", object, &volume["configMap"])
        } else if let Some(object) = volume["secret"]["secretName"].as_str() {
            ("Secret", object, &volume["secret"])
        } else {
            return Err(format!("volume {name} is neither a ConfigMap nor a Secret"));
        };
        // With items, only those are there, under their paths; without, every key.
        let key = match source["items"].as_array() {
            Some(items) => items
                .iter()
                .find(|i| i["path"].as_str() == Some(&file))
                .and_then(|i| i["key"].as_str())
                .ok_or(format!("{kind} volume {name} has no item at {file}"))?
                .to_string(),
            None => file,
        };
        let doc = self
            .of_kind(kind)
            .into_iter()
            .find(|d| d["metadata"]["name"].as_str() == Some(object))
            .ok_or(format!("no {kind} {object} in deploy/k8s/"))?;
        ["data", "stringData"]
            .into_iter()
            .find_map(|f| doc[f][&key].as_str())
            .map(String::from)
            .ok_or(format!("{kind} {object} has no key {key}"))
    }

    /// The tollgate.toml the ConfigMap ships.
    fn config_text(&self) -> String {
        self.of_kind("ConfigMap")
            .into_iter()
            .find_map(|d| d["data"]["tollgate.toml"].as_str())
            .expect("no ConfigMap holds tollgate.toml")
            .to_string()
    }
}

/// Keys a ConfigMap or Secret volume projects (its items), or none when it projects them all.
fn keys_of(source: &Value) -> Vec<String> {
    array(&source["items"])
        .iter()
        .filter_map(|i| i["key"].as_str().map(String::from))
        .collect()
}

fn env_value<'a>(container: &'a Value, name: &str) -> Option<&'a str> {
    array(&container["env"])
        .iter()
        .find(|e| e["name"].as_str() == Some(name))
        .and_then(|e| e["value"].as_str())
}

/// A container's ports, by name (unnamed ones under their number).
fn declared_ports(container: &Value) -> BTreeMap<String, u16> {
    array(&container["ports"])
        .iter()
        .filter_map(|p| {
            let port = u16::try_from(p["containerPort"].as_u64()?).ok()?;
            let name = p["name"]
                .as_str()
                .map(String::from)
                .unwrap_or(port.to_string());
            Some((name, port))
        })
        .collect()
}

/// Whether every label of `selector` is in `labels`.
fn subset(selector: &Value, labels: &Value) -> bool {
    selector
        .as_object()
        .is_some_and(|s| s.iter().all(|(k, v)| labels.get(k) == Some(v)))
}

fn is_empty(value: &Value) -> bool {
    value.as_object().is_none_or(Map::is_empty)
}

/// A Kubernetes quantity (`250m`, `2`, `256Mi`, `1G`) as a number.
fn quantity(text: &str) -> Option<f64> {
    let units = [
        ("Ki", 1024f64),
        ("Mi", 1024f64.powi(2)),
        ("Gi", 1024f64.powi(3)),
        ("Ti", 1024f64.powi(4)),
        ("m", 1e-3),
        ("k", 1e3),
        ("M", 1e6),
        ("G", 1e9),
        ("T", 1e12),
    ];
    for (suffix, factor) in units {
        if let Some(number) = text.strip_suffix(suffix) {
            return number.parse::<f64>().ok().map(|n| n * factor);
        }
    }
    text.parse().ok()
}

/// Field paths of `original` that `decoded` lacks (values may differ: types normalise them).
fn missing_fields(original: &Value, decoded: &Value, at: String, lost: &mut Vec<String>) {
    match (original, decoded) {
        (Value::Object(a), Value::Object(b)) => {
            for (key, value) in a {
                let path = format!("{at}.{key}");
                match b.get(key) {
                    None => lost.push(path),
                    Some(other) => missing_fields(value, other, path, lost),
                }
            }
        }
        (Value::Array(a), Value::Array(b)) => {
            for (i, value) in a.iter().enumerate() {
                match b.get(i) {
                    None => lost.push(format!("{at}[{i}]")),
                    Some(other) => missing_fields(value, other, format!("{at}[{i}]"), lost),
                }
            }
        }
        _ => {}
    }
}

fn kubectl_run(kubectl: &Path, args: &[&str], stdin: Option<&str>) -> Output {
    let mut command = Command::new(kubectl);
    command
        .args(args)
        // No cluster, and never the user's: every command here works offline.
        .env("KUBECONFIG", "/dev/null")
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = command.spawn().expect("kubectl does not start");
    if let Some(input) = stdin {
        child
            .stdin
            .take()
            .unwrap()
            .write_all(input.as_bytes())
            .unwrap();
    }
    child.wait_with_output().unwrap()
}

/// Concatenated JSON documents, as kubectl prints several objects.
fn json_stream(bytes: &[u8]) -> Vec<Value> {
    serde_json::Deserializer::from_slice(bytes)
        .into_iter::<Value>()
        .map(|v| v.expect("kubectl printed invalid JSON"))
        .flat_map(|v| match v["kind"].as_str() {
            Some("List") => array(&v["items"]).to_vec(),
            _ => vec![v],
        })
        .collect()
}

/// The documents of a multi-document YAML text, as separate texts.
fn split_docs(text: &str) -> Vec<String> {
    let mut docs = vec![String::new()];
    for line in text.lines() {
        if line.trim_end() == "---" {
            docs.push(String::new());
        } else {
            let doc = docs.last_mut().unwrap();
            doc.push_str(line);
            doc.push('\n');
        }
    }
    docs.into_iter()
        .filter(|d| {
            d.lines()
                .any(|l| !l.trim().is_empty() && !l.trim_start().starts_with('#'))
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Dockerfile and .dockerignore
// ---------------------------------------------------------------------------------------------

struct Instruction {
    keyword: String,
    args: String,
    /// The here-document that follows the instruction, if any.
    heredoc: Option<String>,
}

struct Stage {
    name: Option<String>,
    instructions: Vec<Instruction>,
}

struct Copy {
    from: Option<String>,
    sources: Vec<String>,
    dest: String,
}

struct Dockerfile {
    stages: Vec<Stage>,
}

impl Dockerfile {
    fn load() -> Self {
        Self::parse(&read("deploy/Dockerfile"))
    }

    fn parse(text: &str) -> Self {
        let heredoc_start =
            regex::Regex::new(r#"<<-?(['"]?)([A-Za-z_][A-Za-z0-9_]*)['"]?"#).unwrap();
        let mut lines = text.lines();
        let mut instructions = Vec::new();
        while let Some(line) = lines.next() {
            let trimmed = line.trim();
            if trimmed.is_empty() || trimmed.starts_with('#') {
                continue;
            }
            let mut full = trimmed.to_string();
            while let Some(stripped) = full.strip_suffix('\\') {
                full = stripped.trim_end().to_string();
                // Comment lines inside a continued instruction are dropped, as Docker does.
                let next = lines.by_ref().find(|l| !l.trim().starts_with('#'));
                match next {
                    Some(next) => {
                        full.push(' ');
                        full.push_str(next.trim());
                    }
                    None => break,
                }
            }
            let (keyword, args) = full.split_once(char::is_whitespace).unwrap_or((&full, ""));
            let heredoc = heredoc_start.captures(args).map(|c| {
                let delimiter = c[2].to_string();
                lines
                    .by_ref()
                    .take_while(|l| l.trim_start_matches('\t') != delimiter)
                    .map(|l| format!("{l}\n"))
                    .collect::<String>()
            });
            instructions.push(Instruction {
                keyword: keyword.to_ascii_uppercase(),
                args: args.trim().to_string(),
                heredoc,
            });
        }
        let mut stages: Vec<Stage> = Vec::new();
        for instruction in instructions {
            if instruction.keyword == "FROM" {
                let words: Vec<&str> = instruction
                    .args
                    .split_whitespace()
                    .filter(|w| !w.starts_with("--"))
                    .collect();
                let name = match words.as_slice() {
                    [_, as_, name] if as_.eq_ignore_ascii_case("as") => Some(name.to_string()),
                    _ => None,
                };
                stages.push(Stage {
                    name,
                    instructions: Vec::new(),
                });
            } else if let Some(stage) = stages.last_mut() {
                stage.instructions.push(instruction);
            }
        }
        Dockerfile { stages }
    }
}

impl Stage {
    fn all(&self, keyword: &str) -> Vec<String> {
        self.instructions
            .iter()
            .filter(|i| i.keyword == keyword)
            .map(|i| i.args.clone())
            .collect()
    }

    fn last(&self, keyword: &str) -> Option<&str> {
        self.instructions
            .iter()
            .rev()
            .find(|i| i.keyword == keyword)
            .map(|i| i.args.as_str())
    }

    /// An instruction's arguments in exec (JSON) form, or split on whitespace.
    fn exec_form(&self, keyword: &str) -> Vec<String> {
        let args = self.last(keyword).unwrap_or("");
        serde_json::from_str(args)
            .unwrap_or_else(|_| args.split_whitespace().map(String::from).collect())
    }

    fn copies(&self) -> Vec<Copy> {
        self.instructions
            .iter()
            .filter(|i| (i.keyword == "COPY" || i.keyword == "ADD") && i.heredoc.is_none())
            .filter_map(|i| {
                let mut from = None;
                let mut paths = Vec::new();
                for word in i.args.split_whitespace() {
                    match word.strip_prefix("--from=") {
                        Some(stage) => from = Some(stage.to_string()),
                        None if word.starts_with("--") => {}
                        None => paths.push(word.to_string()),
                    }
                }
                let dest = paths.pop()?;
                Some(Copy {
                    from,
                    sources: paths,
                    dest,
                })
            })
            .collect()
    }

    /// Files the stage writes from here-documents, as (destination, content).
    fn heredoc_copies(&self) -> Vec<(String, String)> {
        self.instructions
            .iter()
            .filter(|i| i.keyword == "COPY")
            .filter_map(|i| {
                let dest = i.args.split_whitespace().last()?.to_string();
                Some((dest, i.heredoc.clone()?))
            })
            .collect()
    }

    /// The stage's environment, from every ENV (`KEY=value …` or `KEY value`).
    fn env(&self) -> BTreeMap<String, String> {
        let mut env = BTreeMap::new();
        for args in self.all("ENV") {
            if args
                .split_whitespace()
                .next()
                .is_some_and(|w| w.contains('='))
            {
                for pair in args.split_whitespace() {
                    if let Some((k, v)) = pair.split_once('=') {
                        env.insert(k.to_string(), v.trim_matches('"').to_string());
                    }
                }
            } else if let Some((k, v)) = args.split_once(char::is_whitespace) {
                env.insert(k.to_string(), v.trim().trim_matches('"').to_string());
            }
        }
        env
    }
}

/// .dockerignore's rules, applied as Docker does: the last matching rule wins, and a rule that
/// matches a directory leaves out everything in it.
struct DockerIgnore {
    rules: Vec<(bool, Vec<String>)>,
}

impl DockerIgnore {
    fn load() -> Self {
        let rules = read(".dockerignore")
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .map(|l| {
                let (negate, pattern) = match l.strip_prefix('!') {
                    Some(p) => (true, p.trim()),
                    None => (false, l),
                };
                let pattern = pattern.trim_start_matches("./").trim_matches('/');
                (negate, pattern.split('/').map(String::from).collect())
            })
            .collect();
        DockerIgnore { rules }
    }

    fn excludes(&self, path: &str) -> bool {
        let parts: Vec<&str> = path.split('/').collect();
        let mut excluded = false;
        for (negate, pattern) in &self.rules {
            if (1..=parts.len()).any(|n| glob_path(pattern, &parts[..n])) {
                excluded = !negate;
            }
        }
        excluded
    }
}

fn glob_path(pattern: &[String], path: &[&str]) -> bool {
    match pattern.split_first() {
        None => path.is_empty(),
        Some((first, rest)) if first == "**" => {
            (0..=path.len()).any(|i| glob_path(rest, &path[i..]))
        }
        Some((first, rest)) => {
            !path.is_empty()
                && glob(
                    &first.chars().collect::<Vec<_>>(),
                    &path[0].chars().collect::<Vec<_>>(),
                )
                && glob_path(rest, &path[1..])
        }
    }
}

fn glob(pattern: &[char], text: &[char]) -> bool {
    match pattern.split_first() {
        None => text.is_empty(),
        Some(('*', rest)) => (0..=text.len()).any(|i| glob(rest, &text[i..])),
        Some(('?', rest)) => !text.is_empty() && glob(rest, &text[1..]),
        Some((c, rest)) => text.first() == Some(c) && glob(rest, &text[1..]),
    }
}

// ---------------------------------------------------------------------------------------------
// The crate: its manifest and its source
// ---------------------------------------------------------------------------------------------

struct CargoManifest(toml::Value);

impl CargoManifest {
    fn load() -> Self {
        CargoManifest(toml::from_str(&read("Cargo.toml")).expect("Cargo.toml"))
    }

    /// The binaries `cargo build` makes.
    fn binaries(&self) -> Vec<String> {
        let declared: Vec<String> = self.targets("bin").into_iter().map(|(n, _)| n).collect();
        if !declared.is_empty() {
            return declared;
        }
        let package = self.0["package"]["name"].as_str().unwrap().to_string();
        if repo().join("src/main.rs").exists() {
            vec![package]
        } else {
            Vec::new()
        }
    }

    /// (name, path) of the targets of a kind declared by name.
    fn targets(&self, kind: &str) -> Vec<(String, Option<String>)> {
        self.0
            .get(kind)
            .and_then(|t| t.as_array())
            .map(|targets| {
                targets
                    .iter()
                    .map(|t| {
                        let name = t["name"].as_str().unwrap_or("").to_string();
                        (
                            name,
                            t.get("path").and_then(|p| p.as_str()).map(String::from),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Where the targets declared by name live: Cargo reads them all to load the manifest.
    fn declared_target_paths(&self) -> Vec<String> {
        let dirs = [
            ("bin", "src/bin"),
            ("example", "examples"),
            ("test", "tests"),
            ("bench", "benches"),
        ];
        dirs.iter()
            .flat_map(|(kind, dir)| {
                self.targets(kind)
                    .into_iter()
                    .map(move |(name, path)| path.unwrap_or(format!("{dir}/{name}.rs")))
            })
            .collect()
    }
}

struct Source {
    /// Every .rs file under src/, concatenated.
    text: String,
}

impl Source {
    fn load() -> Self {
        let text = files_under(&repo().join("src"))
            .into_iter()
            .filter(|p| p.extension().is_some_and(|e| e == "rs"))
            .map(|p| fs::read_to_string(p).unwrap())
            .collect();
        Source { text }
    }

    /// Whether tollgate reads the environment variable `name`: its name is a string in the
    /// source, or a model's api_key_env names it, or it is RUST_LOG, which tracing's EnvFilter
    /// reads when built from the default environment.
    fn reads_env(&self, name: &str, api_key_envs: &BTreeSet<String>) -> bool {
        self.text.contains(&format!("\"{name}\""))
            || api_key_envs.contains(name)
            || (name == "RUST_LOG" && self.text.contains("from_default_env"))
    }
}

// ---------------------------------------------------------------------------------------------
// Files, YAML and processes
// ---------------------------------------------------------------------------------------------

/// Problems found by a test, reported together.
#[derive(Default)]
struct Problems(Vec<String>);

impl Problems {
    fn ensure(&mut self, ok: bool, message: impl FnOnce() -> String) {
        if !ok {
            self.0.push(message());
        }
    }

    fn push(&mut self, message: String) {
        self.0.push(message);
    }

    fn assert_none(self, what: &str) {
        assert!(
            self.0.is_empty(),
            "{what}: {} problem(s):\n  - {}",
            self.0.len(),
            self.0.join("\n  - ")
        );
    }
}

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn rel(path: &Path) -> String {
    path.strip_prefix(repo())
        .unwrap_or(path)
        .to_string_lossy()
        .into_owned()
}

fn read(rel: &str) -> String {
    let path = repo().join(rel);
    fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Every file under a directory, recursively, sorted.
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(dir) = pending.pop() {
        for entry in fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
            let path = entry.unwrap().path();
            if path.is_dir() {
                pending.push(path);
            } else {
                files.push(path);
            }
        }
    }
    files.sort();
    files
}

/// A path with `.` and `..` resolved lexically.
fn normalize(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for part in path.components() {
        match part {
            std::path::Component::CurDir => {}
            std::path::Component::ParentDir => {
                out.pop();
            }
            other => out.push(other),
        }
    }
    out
}

fn yaml_file(rel: &str) -> Vec<Value> {
    yaml_docs(&read(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

/// The documents of a YAML text as JSON values, with merge keys (`<<`) applied as Docker
/// Compose applies them.
fn yaml_docs(text: &str) -> Result<Vec<Value>, String> {
    let docs = YamlLoader::load_from_str(text).map_err(|e| format!("invalid YAML: {e}"))?;
    docs.into_iter()
        .filter(|d| !matches!(d, Yaml::Null))
        .map(to_json)
        .collect()
}

fn to_json(yaml: Yaml) -> Result<Value, String> {
    Ok(match yaml {
        Yaml::Null => Value::Null,
        Yaml::Boolean(b) => Value::Bool(b),
        Yaml::Integer(i) => Value::from(i),
        Yaml::String(s) => Value::String(s),
        real @ Yaml::Real(_) => {
            let f = real.as_f64().ok_or(format!("unreadable number {real:?}"))?;
            serde_json::Number::from_f64(f)
                .map(Value::Number)
                .ok_or(format!("{f} has no JSON form"))?
        }
        Yaml::Array(items) => {
            Value::Array(items.into_iter().map(to_json).collect::<Result<_, _>>()?)
        }
        Yaml::Hash(hash) => {
            let mut map = Map::new();
            let mut merged = Vec::new();
            for (key, value) in hash {
                let key = match key {
                    Yaml::String(s) | Yaml::Real(s) => s,
                    Yaml::Integer(i) => i.to_string(),
                    Yaml::Boolean(b) => b.to_string(),
                    other => return Err(format!("unsupported mapping key {other:?}")),
                };
                let value = to_json(value)?;
                if key == "<<" {
                    merged.push(value);
                } else {
                    map.insert(key, value);
                }
            }
            // Merged mappings give only the keys the mapping does not set itself.
            for value in merged {
                let sources = match value {
                    Value::Object(o) => vec![o],
                    Value::Array(items) => items
                        .into_iter()
                        .map(|i| match i {
                            Value::Object(o) => Ok(o),
                            _ => Err("`<<` merges mappings only".to_string()),
                        })
                        .collect::<Result<_, _>>()?,
                    _ => return Err("`<<` merges mappings only".into()),
                };
                for source in sources {
                    for (k, v) in source {
                        map.entry(k).or_insert(v);
                    }
                }
            }
            Value::Object(map)
        }
        Yaml::Alias(_) | Yaml::BadValue => return Err("unresolved alias".into()),
    })
}

fn array(value: &Value) -> &[Value] {
    value.as_array().map(Vec::as_slice).unwrap_or(&[])
}

/// A command as words, from its list or string form.
fn words(value: &Value) -> Vec<String> {
    match value {
        Value::String(s) => s.split_whitespace().map(String::from).collect(),
        Value::Array(items) => items
            .iter()
            .filter_map(|i| i.as_str().map(String::from))
            .collect(),
        _ => Vec::new(),
    }
}

fn port_of(listen: &str) -> Option<u16> {
    listen.rsplit_once(':')?.1.parse().ok()
}

fn percent_decode(text: &str) -> String {
    percent_encoding::percent_decode_str(text)
        .decode_utf8_lossy()
        .into_owned()
}

/// Writes to the test process's stderr itself: the test harness captures `eprintln!` of a
/// passing test, and a skipped check must be seen.
fn loud(message: &str) {
    let _ = writeln!(std::io::stderr(), "{message}");
}

fn find_on_path(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join(program))
            .find(|p| p.is_file())
    })
}

fn current_uid() -> Option<u32> {
    let status = fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("Uid:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

fn set_mode(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
}

/// Runs a command to its end, killing it past `limit`.
fn output_within(mut command: Command, limit: Duration) -> Output {
    let mut child = command
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{command:?}: {e}"));
    // Read both pipes while waiting, so a chatty child never blocks on a full pipe.
    let drain = |pipe: Option<Box<dyn std::io::Read + Send>>| {
        std::thread::spawn(move || {
            let mut bytes = Vec::new();
            if let Some(mut pipe) = pipe {
                let _ = pipe.read_to_end(&mut bytes);
            }
            bytes
        })
    };
    let stdout = drain(child.stdout.take().map(|p| Box::new(p) as _));
    let stderr = drain(child.stderr.take().map(|p| Box::new(p) as _));
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "{command:?} did not finish in {limit:?}:\n{}",
                String::from_utf8_lossy(&stderr.join().unwrap())
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Output {
        status,
        stdout: stdout.join().unwrap(),
        stderr: stderr.join().unwrap(),
    }
}

struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        if self.0.is_dir() {
            set_mode(&self.0, 0o755);
            let _ = fs::remove_dir_all(&self.0);
        } else {
            let _ = fs::remove_file(&self.0);
        }
    }
}
