use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use velocity::{config, ctl, observe, server, testserver};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(name = "velocity", version, about = "HTTP load balancer and reverse proxy")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the load balancer.
    Run {
        #[arg(short, long, default_value = "velocity.yaml")]
        config: PathBuf,
        /// Reload the config when the file changes (checked every second); SIGHUP always reloads.
        #[arg(long)]
        watch: bool,
    },
    /// Validate a config file without running it.
    Check {
        #[arg(short, long, default_value = "velocity.yaml")]
        config: PathBuf,
        /// The file to check, as `nginx -t` users expect (`velocity check FILE`); wins over -c.
        file: Option<PathBuf>,
    },
    /// Operate a running Velocity through its admin API (prints tables).
    Ctl {
        /// The admin API's address.
        #[arg(long, default_value = "127.0.0.1:9901")]
        admin: String,
        /// The environment variable holding the bearer token (sent when set).
        #[arg(long, default_value = "VELOCITY_ADMIN_TOKEN")]
        token_env: String,
        #[command(subcommand)]
        action: CtlAction,
    },
    /// Start three demo backends and the balancer on 127.0.0.1:8000.
    Demo,
    /// A tiny backend that answers every request with its name.
    Testserver {
        /// Address to listen on; defaults to 127.0.0.1:$PORT (or 127.0.0.1:8080).
        #[arg(long)]
        listen: Option<String>,
        #[arg(long)]
        name: Option<String>,
        /// Delay before answering, such as 100ms (or $DURATION in seconds).
        #[arg(long)]
        delay: Option<String>,
    },
}

#[derive(Subcommand)]
enum CtlAction {
    /// Every service's backends: id, address, weight, state, health, in-flight, requests.
    Services,
    /// Add a backend to a service (it takes traffic after its first passing health check).
    Add {
        service: String,
        address: String,
        #[arg(long, default_value_t = 1)]
        weight: u32,
    },
    /// Stop new requests to a backend and remove it once its in-flight requests are done.
    Drain { service: String, address: String },
    /// Remove a backend at once.
    Remove { service: String, address: String },
    /// Set a backend's weight.
    Weight { service: String, address: String, weight: u32 },
    /// Read the config file again (as SIGHUP).
    Reload,
}

const DEMO_CONFIG: &str = include_str!("../examples/demo.yaml");
const DEMO_BACKENDS: [(&str, &str); 3] =
    [("127.0.0.1:9001", "demo-1"), ("127.0.0.1:9002", "demo-2"), ("127.0.0.1:9003", "demo-3")];

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Check { config, file } => check(&file.unwrap_or(config)),
        Command::Run { config, watch } => {
            observe::init_logging();
            match config::load(&config) {
                Ok(cfg) => block_on(server::run(cfg, server::Options { config_path: Some(config), watch })),
                Err(errors) => {
                    for e in errors {
                        eprintln!("{e}");
                    }
                    ExitCode::FAILURE
                }
            }
        }
        Command::Ctl { admin, token_env, action } => ctl_cmd(&admin, &token_env, action),
        Command::Demo => {
            observe::init_logging();
            demo()
        }
        Command::Testserver { listen, name, delay } => {
            observe::init_logging();
            testserver_cmd(listen, name, delay)
        }
    }
}

fn check(path: &Path) -> ExitCode {
    match config::load(path) {
        Ok(cfg) => {
            if let Some(equivalent) = &cfg.legacy_equivalent {
                println!("{}: legacy Go Velocity format; it loads as this config:", path.display());
                println!("{equivalent}");
            }
            for line in config::summary_lines(&cfg) {
                println!("{line}");
            }
            // Warnings do not fail the check; on stderr with the problems.
            for w in velocity::tls::check_warnings(&cfg) {
                eprintln!("warning: {w}");
            }
            println!("{}: ok", path.display());
            ExitCode::SUCCESS
        }
        // On stderr, as `nginx -t` does: scripts keep stdout for the summary.
        Err(errors) => {
            for e in errors {
                eprintln!("{e}");
            }
            ExitCode::FAILURE
        }
    }
}

/// A runtime with one worker per CPU this process may use (so `taskset -c 1` gives one).
fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    let workers = std::thread::available_parallelism().map_or(1, |n| n.get());
    tokio::runtime::Builder::new_multi_thread().worker_threads(workers).enable_all().build()
}

fn block_on(fut: impl std::future::Future<Output = Result<(), String>>) -> ExitCode {
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(fut) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            ExitCode::FAILURE
        }
    }
}

fn demo() -> ExitCode {
    let cfg = match config::parse(Path::new("examples/demo.yaml"), DEMO_CONFIG) {
        Ok(cfg) => cfg,
        Err(errors) => {
            for e in errors {
                eprintln!("{e}");
            }
            return ExitCode::FAILURE;
        }
    };
    block_on(async move {
        for (addr, name) in DEMO_BACKENDS {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|e| format!("demo backend {name} cannot listen on {addr}: {e}"))?;
            tokio::spawn(testserver::serve(listener, name.to_string(), Duration::ZERO));
        }
        println!("Velocity demo: backends demo-1..3 on 127.0.0.1:9001-9003, balancer on 127.0.0.1:8000");
        println!("  curl -s localhost:8000/                          # weighted round robin: demo-1 gets 3 of 5");
        println!("  curl -s -H 'Host: api.local' localhost:8000/api/  # least connections");
        println!("  Ctrl-C to stop.");
        server::run(cfg, server::Options::default()).await
    })
}

fn ctl_cmd(admin: &str, token_env: &str, action: CtlAction) -> ExitCode {
    let action = match action {
        CtlAction::Services => ctl::Action::Services,
        CtlAction::Add { service, address, weight } => ctl::Action::Add { service, address, weight },
        CtlAction::Drain { service, address } => ctl::Action::Drain { service, address },
        CtlAction::Remove { service, address } => ctl::Action::Remove { service, address },
        CtlAction::Weight { service, address, weight } => ctl::Action::Weight { service, address, weight },
        CtlAction::Reload => ctl::Action::Reload,
    };
    let token = std::env::var(token_env).ok().filter(|t| !t.trim().is_empty());
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(ctl::run(admin, token.as_deref().map(str::trim), &action)) {
        Ok(out) => {
            print!("{out}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{e}");
            ExitCode::FAILURE
        }
    }
}

fn testserver_cmd(listen: Option<String>, name: Option<String>, delay: Option<String>) -> ExitCode {
    let listen =
        listen.unwrap_or_else(|| format!("127.0.0.1:{}", std::env::var("PORT").unwrap_or_else(|_| "8080".into())));
    let addr: SocketAddr = match listen.parse() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("bad --listen {listen:?}: {e}");
            return ExitCode::FAILURE;
        }
    };
    let delay = match delay {
        Some(d) => config::parse_duration(&d),
        None => match std::env::var("DURATION") {
            Ok(secs) => secs
                .trim()
                .parse::<f64>()
                .ok()
                .filter(|s| s.is_finite() && *s >= 0.0)
                .map(Duration::from_secs_f64)
                .ok_or_else(|| format!("DURATION must be seconds, got {secs:?}")),
            Err(_) => Ok(Duration::ZERO),
        },
    };
    let delay = match delay {
        Ok(d) => d,
        Err(e) => {
            eprintln!("bad delay: {e}");
            return ExitCode::FAILURE;
        }
    };
    block_on(async move { testserver::run(addr, name, delay).await.map_err(|e| format!("testserver: {e}")) })
}
