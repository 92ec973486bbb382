//! The Docker packaging checked against the binary, without a Docker engine: `docker-compose.yml`
//! is parsed and every fbsync service in it (one built from `.`) must run a real subcommand, set
//! only variables fbsync reads, and be reachable where it listens; the `Dockerfile`'s final stage
//! must run the binary as a non-root user.
//!
//! Healthchecks: every long-running fbsync service (`ingest`, `worker`, `up`) must have a
//! healthcheck of its own, on an HTTP listener that role serves. Depending on a healthy service
//! is not enough: a worker's own failure (its database or store gone) would go unseen.

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;

use serde_yaml_ng::{Mapping, Value};

const COMPOSE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/docker-compose.yml");
const ENV_EXAMPLE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/.env.example");
const DOCKERFILE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/Dockerfile");
const DOCKERIGNORE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/.dockerignore");

/// Where the binary is installed in the image, and what the image runs.
const BINARY_IN_IMAGE: &str = "/usr/local/bin/fbsync";

fn read(path: &str) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("cannot read {path}: {e}"))
}

/// The subcommands of the real binary: the first word of each entry in the "Commands:" section
/// of `fbsync --help` (clap's own `help` left out: no service runs it).
fn subcommands() -> BTreeSet<String> {
    let output = Command::new(env!("CARGO_BIN_EXE_fbsync"))
        .arg("--help")
        .output()
        .expect("fbsync --help runs");
    assert!(output.status.success(), "fbsync --help failed: {output:?}");
    let help = String::from_utf8(output.stdout).expect("help is UTF-8");
    let commands: BTreeSet<String> = help
        .lines()
        .skip_while(|line| line.trim() != "Commands:")
        .skip(1)
        .take_while(|line| !line.trim().is_empty())
        // An entry starts at the indentation; a wrapped description is indented further.
        .filter(|line| line.starts_with("  ") && !line.starts_with("    "))
        .filter_map(|line| line.split_whitespace().next())
        .filter(|command| *command != "help")
        .map(str::to_owned)
        .collect();
    assert!(
        commands.contains("ingest") && commands.contains("worker"),
        "the Commands: section of fbsync --help was not understood: {commands:?}\n{help}"
    );
    commands
}

/// The variables fbsync reads, with `.env.example`'s value when it has an active one: every
/// `NAME=` line, active or commented out (`# NAME=`), outside the "Not read yet" section.
fn variables_read(env_example: &str) -> BTreeMap<String, Option<String>> {
    let mut read = BTreeMap::new();
    let mut not_read_section = false;
    for line in env_example.lines().map(str::trim) {
        if let Some(heading) = line.strip_prefix("# ---") {
            not_read_section = heading.contains("Not read yet");
            continue;
        }
        if not_read_section {
            continue;
        }
        let (active, assignment) = match line.strip_prefix('#') {
            Some(commented) => (false, commented.trim_start()),
            None => (true, line),
        };
        let Some((name, value)) = assignment.split_once('=') else {
            continue;
        };
        let is_name = !name.is_empty()
            && name.starts_with(|c: char| c.is_ascii_uppercase())
            && name
                .chars()
                .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_');
        if is_name {
            let value = active.then(|| value.trim().to_owned());
            // An active line wins over a commented example of the same name.
            let entry = read.entry(name.to_owned()).or_insert(None);
            if value.is_some() {
                *entry = value;
            }
        }
    }
    read
}

/// docker-compose.yml, parsed, with its `<<: *anchor` merge keys applied as Compose does.
fn compose_file() -> Value {
    let mut compose: Value =
        serde_yaml_ng::from_str(&read(COMPOSE)).expect("docker-compose.yml is valid YAML");
    compose
        .apply_merge()
        .expect("docker-compose.yml's merge keys apply");
    compose
}

/// A scalar as Compose reads it (`"0"`, `0` and `false` are all strings to a container).
fn scalar(value: &Value) -> Option<String> {
    match value {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

/// A list of strings, or one string (Compose accepts both for `command` and `test`).
fn words(value: &Value) -> Vec<String> {
    match value {
        Value::Sequence(items) => items.iter().filter_map(scalar).collect(),
        other => scalar(other)
            .map(|s| s.split_whitespace().map(str::to_owned).collect())
            .unwrap_or_default(),
    }
}

/// A service's `environment`, as a mapping or as a list of `NAME=value`.
fn environment(service: &Value) -> BTreeMap<String, Option<String>> {
    match service.get("environment") {
        Some(Value::Mapping(map)) => map
            .iter()
            .filter_map(|(name, value)| Some((scalar(name)?, scalar(value))))
            .collect(),
        Some(Value::Sequence(items)) => items
            .iter()
            .filter_map(scalar)
            .map(|item| match item.split_once('=') {
                Some((name, value)) => (name.to_owned(), Some(value.to_owned())),
                None => (item, None),
            })
            .collect(),
        _ => BTreeMap::new(),
    }
}

/// The names of a list or a mapping (`depends_on` takes both).
fn names(value: Option<&Value>) -> Vec<String> {
    match value {
        Some(Value::Sequence(items)) => items.iter().filter_map(scalar).collect(),
        Some(Value::Mapping(map)) => map.keys().filter_map(scalar).collect(),
        _ => Vec::new(),
    }
}

/// Whether the service is the fbsync image: built from the repository's root.
fn is_fbsync(service: &Value) -> bool {
    let context = match service.get("build") {
        Some(Value::Mapping(build)) => build.get("context").and_then(scalar),
        Some(other) => scalar(other),
        None => None,
    };
    matches!(context.as_deref(), Some("." | "./"))
}

/// The port of an address like `0.0.0.0:5000` or `[::]:5000`, and whether it listens on every
/// interface (so a port published from the container reaches it).
fn port_of(addr: &str) -> Option<(u16, bool)> {
    let (host, port) = addr.rsplit_once(':')?;
    let every_interface = matches!(host, "0.0.0.0" | "[::]");
    Some((port.parse().ok()?, every_interface))
}

/// The container ports a service publishes, short (`"127.0.0.1:5001:5001/tcp"`) or long syntax.
fn container_ports(service: &Value) -> Vec<u16> {
    let Some(Value::Sequence(ports)) = service.get("ports") else {
        return Vec::new();
    };
    ports
        .iter()
        .filter_map(|port| match port {
            Value::Mapping(long) => long.get("target").and_then(scalar),
            short => scalar(short)
                .and_then(|s| {
                    s.rsplit(':')
                        .next()
                        .map(|p| p.split('/').next().map(str::to_owned))
                })
                .flatten(),
        })
        .filter_map(|port| port.parse().ok())
        .collect()
}

/// The named volumes a service mounts (not bind mounts, which start with `/`, `.` or `~`).
fn named_volumes(service: &Value) -> Vec<String> {
    let Some(Value::Sequence(volumes)) = service.get("volumes") else {
        return Vec::new();
    };
    volumes
        .iter()
        .filter_map(|volume| match volume {
            Value::Mapping(long) => {
                let is_volume = long.get("type").and_then(scalar).as_deref() == Some("volume");
                long.get("source").and_then(scalar).filter(|_| is_volume)
            }
            short => {
                let short = scalar(short)?;
                let (source, _) = short.split_once(':')?;
                Some(source.to_owned())
            }
        })
        .filter(|source| !source.starts_with(['/', '.', '~', '$']))
        .collect()
}

/// The addresses each long-running role serves HTTP on, by the variable that sets each one.
fn listeners_of(command: &str) -> &'static [&'static str] {
    match command {
        "ingest" => &["INGEST_ADDR", "INGEST_METRICS_ADDR"],
        "worker" => &["WORKER_METRICS_ADDR"],
        "up" => &["INGEST_ADDR", "INGEST_METRICS_ADDR"],
        _ => &[],
    }
}

/// Everything wrong with `compose` against the binary's `commands` and the variables it
/// `reads` (with `.env.example`'s values, which is what `env_file: .env` gives by default).
fn compose_problems(
    compose: &Value,
    commands: &BTreeSet<String>,
    reads: &BTreeMap<String, Option<String>>,
) -> Vec<String> {
    let mut problems = Vec::new();
    let empty = Mapping::new();
    let services = compose
        .get("services")
        .and_then(Value::as_mapping)
        .unwrap_or(&empty);
    let declared_volumes: BTreeSet<String> = compose
        .get("volumes")
        .and_then(Value::as_mapping)
        .map(|volumes| volumes.keys().filter_map(scalar).collect())
        .unwrap_or_default();
    let service_names: BTreeSet<String> = services.keys().filter_map(scalar).collect();
    if services.is_empty() {
        problems.push("no services".to_owned());
    }

    for (name, service) in services {
        let name = scalar(name).unwrap_or_default();

        for volume in named_volumes(service) {
            if !declared_volumes.contains(&volume) {
                problems.push(format!(
                    "{name}: volume {volume:?} is not declared under top-level volumes"
                ));
            }
        }
        for dependency in names(service.get("depends_on")) {
            let Some(target) = services.get(dependency.as_str()) else {
                problems.push(format!("{name}: depends on {dependency:?}, not a service"));
                continue;
            };
            let condition = service
                .get("depends_on")
                .and_then(|d| d.get(dependency.as_str()))
                .and_then(|d| d.get("condition"))
                .and_then(scalar);
            match condition.as_deref() {
                Some("service_healthy") if target.get("healthcheck").is_none() => {
                    problems.push(format!(
                        "{name}: waits for {dependency} to be healthy, which has no healthcheck"
                    ));
                }
                Some("service_completed_successfully")
                    if target
                        .get("restart")
                        .and_then(scalar)
                        .is_some_and(|r| r != "no") =>
                {
                    problems.push(format!(
                        "{name}: waits for {dependency} to complete, which restarts"
                    ));
                }
                _ => {}
            }
        }

        if !is_fbsync(service) {
            continue;
        }
        // From here on: a service running the fbsync image.
        let command = words(service.get("command").unwrap_or(&Value::Null));
        let Some(subcommand) = command.first() else {
            problems.push(format!(
                "{name}: no command (the image would only print --help)"
            ));
            continue;
        };
        if !commands.contains(subcommand) {
            problems.push(format!(
                "{name}: command {subcommand:?} is not an fbsync subcommand ({commands:?})"
            ));
        }

        let env = environment(service);
        for variable in env.keys() {
            if !reads.contains_key(variable) {
                problems.push(format!(
                    "{name}: sets {variable}, which fbsync does not read (.env.example)"
                ));
            }
        }
        if service.get("env_file").is_none() {
            problems.push(format!("{name}: no env_file: .env (the secrets are there)"));
        }

        if name == "worker" && service.get("ports").is_some() {
            problems.push(format!(
                "{name}: publishes ports, so `--scale worker=N` would collide"
            ));
        }

        // What each listener is at: the service's environment, else .env.example's value.
        let listener_ports: BTreeMap<&str, Option<(u16, bool)>> = listeners_of(subcommand)
            .iter()
            .map(|variable| {
                let addr = env
                    .get(*variable)
                    .cloned()
                    .flatten()
                    .or_else(|| reads.get(*variable).cloned().flatten());
                (*variable, addr.as_deref().and_then(port_of))
            })
            .collect();
        for port in container_ports(service) {
            let served = listener_ports
                .iter()
                .find(|(_, listener)| listener.is_some_and(|(p, _)| p == port));
            match served {
                None => problems.push(format!(
                    "{name}: publishes port {port}, on which it serves nothing ({listener_ports:?})"
                )),
                Some((variable, Some((_, false)))) => problems.push(format!(
                    "{name}: publishes port {port}, but {variable} listens on loopback only"
                )),
                Some(_) => {}
            }
        }
        if subcommand == "ingest" {
            let published = container_ports(service);
            match listener_ports.get("INGEST_ADDR").copied().flatten() {
                Some((port, _)) if published.contains(&port) => {}
                other => problems.push(format!(
                    "{name}: INGEST_ADDR's port ({other:?}) is not published ({published:?})"
                )),
            }
        }

        if !listeners_of(subcommand).is_empty() {
            let test = service
                .get("healthcheck")
                .and_then(|h| h.get("test"))
                .map(words)
                .unwrap_or_default();
            let checked_ports: Vec<u16> = test
                .iter()
                .flat_map(|word| word.split_whitespace())
                .filter_map(|word| word.strip_prefix("http://"))
                .filter_map(|rest| rest.split('/').next().and_then(port_of))
                .map(|(port, _)| port)
                .collect();
            let serves = |port: &u16| {
                listener_ports
                    .values()
                    .any(|listener| listener.is_some_and(|(p, _)| p == *port))
            };
            if checked_ports.is_empty() || !checked_ports.iter().all(serves) {
                problems.push(format!(
                    "{name}: needs a healthcheck on a listener it serves ({listener_ports:?}), \
                     has {test:?}"
                ));
            }
        }
    }
    for required in ["rabbitmq", "ingest", "worker"] {
        if !service_names.contains(required) {
            problems.push(format!("no {required} service"));
        }
    }
    problems
}

#[test]
fn the_compose_stack_is_consistent_with_the_binary() {
    let commands = subcommands();
    let reads = variables_read(&read(ENV_EXAMPLE));
    // The parser of .env.example: active and commented names in, "Not read yet" out.
    for name in [
        "AMQP_URL",
        "SPACES_ENDPOINT",
        "WORKER_METRICS_ADDR",
        "INGEST_ADDR",
        "FACEBOOK_APP_ID",
        "SHOPIFY_API_KEY",
    ] {
        assert!(reads.contains_key(name), "{name} missing from {reads:?}");
    }
    for name in ["FACEBOOK_WEBHOOK_ADDRESS", "RUST_LOG"] {
        assert!(!reads.contains_key(name), "{name} is not read by fbsync");
    }
    let compose = compose_file();

    let problems = compose_problems(&compose, &commands, &reads);
    assert!(
        problems.is_empty(),
        "docker-compose.yml:\n{}",
        problems.join("\n")
    );

    // The fbsync services are the ones expected.
    let services = compose["services"].as_mapping().expect("services");
    let fbsync: BTreeSet<String> = services
        .iter()
        .filter(|(_, service)| is_fbsync(service))
        .filter_map(|(name, _)| scalar(name))
        .collect();
    assert_eq!(
        fbsync,
        BTreeSet::from([
            "ingest".to_owned(),
            "scheduler".to_owned(),
            "worker".to_owned()
        ])
    );

    // The fbsync services reach the other containers, and the object store's credentials and
    // bucket.
    for name in &fbsync {
        let env = environment(&compose["services"][name.as_str()]);
        let get = |variable: &str| env.get(variable).cloned().flatten().unwrap_or_default();
        assert!(
            get("AMQP_URL").contains("@rabbitmq:5672"),
            "{name}: {env:?}"
        );
        assert!(
            get("DATABASE_URL").contains("@postgres:5432/"),
            "{name}: {env:?}"
        );
        assert_eq!(get("SPACES_OBJECT_PUTS_PER_5MIN"), "0", "{name}");
        assert_eq!(get("DATA_DIR"), "/var/lib/fbsync", "{name}");
        let problems = object_store_problems(&compose, &env);
        assert!(problems.is_empty(), "{name}: {}", problems.join("\n"));
    }

    // The checks catch what they are for: each mistake below is reported.
    let mistakes: [Mistake; 7] = [
        ("AMQP_ULR", |c| {
            set(c, &["services", "worker", "environment", "AMQP_ULR"], "x");
        }),
        ("FACEBOOK_WEBHOOK_ADDRESS", |c| {
            set(
                c,
                &[
                    "services",
                    "ingest",
                    "environment",
                    "FACEBOOK_WEBHOOK_ADDRESS",
                ],
                "1",
            );
        }),
        ("\"schedular\" is not an fbsync subcommand", |c| {
            c["services"]["worker"]["command"] = Value::Sequence(vec!["schedular".into()]);
        }),
        ("not declared under top-level volumes", |c| {
            c["volumes"]
                .as_mapping_mut()
                .expect("volumes")
                .remove("fbsync-data");
        }),
        ("depends on \"rabbit\", not a service", |c| {
            set(
                c,
                &["services", "worker", "depends_on", "rabbit", "condition"],
                "service_started",
            );
        }),
        ("publishes ports", |c| {
            c["services"]["worker"]["ports"] = Value::Sequence(vec!["5002:5002".into()]);
        }),
        ("INGEST_ADDR's port", |c| {
            set(
                c,
                &["services", "ingest", "environment", "INGEST_ADDR"],
                "0.0.0.0:8080",
            );
        }),
    ];
    for (expected, mistake) in mistakes {
        let mut broken = compose.clone();
        mistake(&mut broken);
        let problems = compose_problems(&broken, &commands, &reads);
        assert!(
            problems.iter().any(|p| p.contains(expected)),
            "a mistake went unnoticed: expected {expected:?}, got {problems:?}"
        );
    }
    // The object store's checks catch a wrong key, secret, endpoint or bucket.
    let worker_env = environment(&compose["services"]["worker"]);
    let store_mistakes: [(&str, &str, &str); 4] = [
        ("SPACES_API_KEY", "someone-else", "SPACES_API_KEY is not"),
        ("SPACES_API_SECRET", "wrong", "SPACES_API_SECRET is not"),
        ("SPACES_ENDPOINT", "http://minio:9000", "SPACES_ENDPOINT"),
        ("SPACES_BUCKET", "another-bucket", "does not create"),
    ];
    for (variable, value, expected) in store_mistakes {
        let mut env = worker_env.clone();
        env.insert(variable.to_owned(), Some(value.to_owned()));
        let problems = object_store_problems(&compose, &env);
        assert!(
            problems.iter().any(|p| p.contains(expected)),
            "a mistake went unnoticed: {variable}={value}, expected {expected:?}, got {problems:?}"
        );
    }

    let mut no_healthcheck = compose.clone();
    no_healthcheck["services"]["worker"]
        .as_mapping_mut()
        .expect("worker")
        .remove("healthcheck");
    let problems = compose_problems(&no_healthcheck, &commands, &reads);
    assert!(
        problems
            .iter()
            .any(|p| p.contains("worker: needs a healthcheck")),
        "{problems:?}"
    );
}

/// The compose service that is the object store, and the one that creates its bucket.
const OBJECT_STORE: &str = "seaweedfs";
const OBJECT_STORE_INIT: &str = "seaweedfs-init";
/// The S3 port of the object store's container.
const OBJECT_STORE_S3_PORT: u16 = 8333;

/// Everything wrong with an fbsync service's environment `env` against the object store of
/// `compose`: its endpoint must be the store's service, its key and secret the identity the
/// store starts with (`AWS_ACCESS_KEY_ID` and `AWS_SECRET_ACCESS_KEY`), and its bucket the one
/// the init step creates.
fn object_store_problems(compose: &Value, env: &BTreeMap<String, Option<String>>) -> Vec<String> {
    let mut problems = Vec::new();
    let get = |variable: &str| env.get(variable).cloned().flatten().unwrap_or_default();
    let services = &compose["services"];
    let store = &services[OBJECT_STORE];
    if !store.is_mapping() {
        problems.push(format!("no {OBJECT_STORE} service"));
        return problems;
    }
    let endpoint = format!("http://{OBJECT_STORE}:{OBJECT_STORE_S3_PORT}");
    if get("SPACES_ENDPOINT") != endpoint {
        problems.push(format!(
            "SPACES_ENDPOINT is {:?}, not {endpoint:?}",
            get("SPACES_ENDPOINT")
        ));
    }
    let store_env = environment(store);
    for (variable, store_variable) in [
        ("SPACES_API_KEY", "AWS_ACCESS_KEY_ID"),
        ("SPACES_API_SECRET", "AWS_SECRET_ACCESS_KEY"),
    ] {
        let expected = store_env.get(store_variable).cloned().flatten();
        if expected.is_none() || Some(get(variable)) != expected {
            problems.push(format!(
                "{variable} is not {OBJECT_STORE}'s {store_variable} ({expected:?})"
            ));
        }
    }

    // The init step runs `s3.bucket.create -name <bucket>` in `weed shell`, the bucket named
    // outright or through its BUCKET variable, and confirms the bucket is listed.
    let init = &services[OBJECT_STORE_INIT];
    let bucket = get("SPACES_BUCKET");
    let init_env = environment(init);
    let script = words(&init["command"]).join(" ");
    let names_bucket = |prefix: &str| {
        script.contains(&format!("{prefix} {bucket}"))
            || (script.contains(&format!("{prefix} $$BUCKET"))
                && init_env.get("BUCKET") == Some(&Some(bucket.clone())))
    };
    let creates = names_bucket("s3.bucket.create -name")
        && script.contains("weed shell")
        && script.contains("s3.bucket.list");
    if bucket.is_empty() || !creates {
        problems.push(format!(
            "{OBJECT_STORE_INIT} does not create {bucket:?}: {script}"
        ));
    }
    let shell_targets_store = script.contains(&format!("-master={OBJECT_STORE}:"))
        && script.contains(&format!("-filer={OBJECT_STORE}:"));
    if !shell_targets_store {
        problems.push(format!(
            "{OBJECT_STORE_INIT}'s weed shell is not pointed at {OBJECT_STORE}: {script}"
        ));
    }
    if init["image"] != store["image"] {
        problems.push(format!(
            "{OBJECT_STORE_INIT} runs {:?}, not {OBJECT_STORE}'s {:?}",
            init["image"], store["image"]
        ));
    }
    // A pinned release, not `latest` or no tag.
    let image = scalar(&store["image"]).unwrap_or_default();
    match image.rsplit_once(':') {
        Some((_, tag)) if tag != "latest" && !tag.contains('/') => {}
        _ => problems.push(format!(
            "{OBJECT_STORE}: image {image:?} is not pinned to a release"
        )),
    }
    let workers_wait = names(services["worker"].get("depends_on"))
        .contains(&OBJECT_STORE_INIT.to_owned())
        && scalar(&services["worker"]["depends_on"][OBJECT_STORE_INIT]["condition"]).as_deref()
            == Some("service_completed_successfully");
    if !workers_wait {
        problems.push(format!(
            "worker does not wait for {OBJECT_STORE_INIT} to complete successfully"
        ));
    }
    problems
}

/// A mistake made to a copy of the compose file, and what its report must say.
type Mistake = (&'static str, fn(&mut Value));

/// Sets `value` at `path` in `compose`, creating mappings on the way.
fn set(compose: &mut Value, path: &[&str], value: &str) {
    let mut node = compose;
    for key in path {
        if !node.is_mapping() {
            *node = Value::Mapping(Mapping::new());
        }
        let map = node.as_mapping_mut().expect("a mapping");
        node = map
            .entry(Value::String((*key).to_owned()))
            .or_insert(Value::Null);
    }
    *node = Value::String(value.to_owned());
}

#[test]
fn the_image_runs_the_binary_as_an_unprivileged_user() {
    let dockerfile = read(DOCKERFILE);
    // Instructions, continuation lines joined, comments dropped.
    let mut instructions: Vec<String> = Vec::new();
    let mut continued = false;
    for line in dockerfile.lines() {
        let trimmed = line.trim();
        if trimmed.starts_with('#') || (trimmed.is_empty() && !continued) {
            continue;
        }
        let (text, continues) = match trimmed.strip_suffix('\\') {
            Some(text) => (text.trim(), true),
            None => (trimmed, false),
        };
        match instructions.last_mut() {
            Some(last) if continued => {
                last.push(' ');
                last.push_str(text);
            }
            _ => instructions.push(text.to_owned()),
        }
        continued = continues;
    }
    let keyword = |instruction: &str| {
        instruction
            .split_whitespace()
            .next()
            .unwrap_or_default()
            .to_ascii_uppercase()
    };
    let argument = |instruction: &str| {
        instruction
            .split_once(char::is_whitespace)
            .map(|(_, rest)| rest.trim().to_owned())
            .unwrap_or_default()
    };
    let stages: Vec<&[String]> = {
        let starts: Vec<usize> = instructions
            .iter()
            .enumerate()
            .filter(|(_, i)| keyword(i) == "FROM")
            .map(|(n, _)| n)
            .collect();
        starts
            .iter()
            .enumerate()
            .map(|(k, &start)| {
                let end = starts.get(k + 1).copied().unwrap_or(instructions.len());
                &instructions[start..end]
            })
            .collect()
    };
    assert!(stages.len() >= 2, "a multi-stage build: {instructions:#?}");
    let builder = stages[..stages.len() - 1].concat().join("\n");
    assert!(
        builder.contains("cargo build --release") && builder.contains("--locked"),
        "the builder builds the locked release: {builder}"
    );
    assert!(builder.contains("--bin fbsync"), "{builder}");

    let runtime = stages[stages.len() - 1];
    let base = argument(&runtime[0]);
    assert!(
        base.starts_with("debian:") && base.contains("slim"),
        "a small runtime image: {base}"
    );

    let user = runtime
        .iter()
        .filter(|i| keyword(i) == "USER")
        .map(|i| argument(i))
        .next_back()
        .expect("the final stage sets USER");
    let user_name = user.split(':').next().unwrap_or_default();
    assert!(
        !matches!(user_name, "" | "root" | "0"),
        "the final stage runs as root: USER {user}"
    );

    let entrypoint = runtime
        .iter()
        .filter(|i| keyword(i) == "ENTRYPOINT")
        .map(|i| argument(i))
        .next_back()
        .expect("the final stage sets ENTRYPOINT");
    let entrypoint: Vec<String> =
        serde_json::from_str(&entrypoint).expect("ENTRYPOINT in exec form (a JSON array)");
    assert_eq!(entrypoint, [BINARY_IN_IMAGE]);
    assert!(
        runtime
            .iter()
            .any(|i| keyword(i) == "COPY" && i.contains("--from=") && i.ends_with(BINARY_IN_IMAGE)),
        "the final stage copies the binary to {BINARY_IN_IMAGE}: {runtime:#?}"
    );
    let runtime_text = runtime.join("\n");
    assert!(runtime_text.contains("ca-certificates"), "{runtime_text}");
    assert!(
        runtime
            .iter()
            .any(|i| keyword(i) == "WORKDIR" && argument(i) == "/var/lib/fbsync"),
        "{runtime_text}"
    );

    // The tools the compose healthchecks of the fbsync services run are in the image, and the
    // ports they publish are exposed.
    let compose = compose_file();
    let exposed: BTreeSet<u16> = runtime
        .iter()
        .filter(|i| keyword(i) == "EXPOSE")
        .flat_map(|i| {
            argument(i)
                .split_whitespace()
                .filter_map(|p| p.split('/').next()?.parse().ok())
                .collect::<Vec<u16>>()
        })
        .collect();
    for (name, service) in compose["services"].as_mapping().expect("services") {
        if !is_fbsync(service) {
            continue;
        }
        let test = words(&service["healthcheck"]["test"]);
        if let Some(tool) = test.get(1).filter(|_| test[0] == "CMD") {
            assert!(
                runtime_text.contains(tool.as_str()),
                "{name:?}: the healthcheck runs {tool}, which the runtime image lacks"
            );
        }
        for port in container_ports(service) {
            assert!(exposed.contains(&port), "{name:?}: port {port} not EXPOSEd");
        }
    }

    let ignored: BTreeSet<String> = read(DOCKERIGNORE)
        .lines()
        .map(|line| line.trim().trim_end_matches('/').to_owned())
        .collect();
    for path in ["target", "data", ".git", ".env"] {
        assert!(ignored.contains(path), ".dockerignore must exclude {path}");
    }
}
