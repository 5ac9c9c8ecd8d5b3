//! The `impersonate-proxy` command line: parse arguments, set up tracing, load config, pick the
//! exit code. Everything else lives in the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;

use impersonate_proxy::cli::{self, CliError};

#[derive(Parser)]
#[command(name = "impersonate-proxy", version, about)]
struct Cli {
    /// Log format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    /// Proxy worker threads, each serving its own connections (overrides `limits.workers`;
    /// default one per core).
    #[arg(long, global = true)]
    workers: Option<usize>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the proxy (and the admin endpoints).
    Run {
        #[arg(long, short, default_value = "config.yaml")]
        config: PathBuf,
    },
    /// Validate the config and print identities and routes; with --url, a dry run.
    Check {
        #[arg(long, short, default_value = "config.yaml")]
        config: PathBuf,
        /// Say which route and identity a request to this URL would get.
        #[arg(long)]
        url: Option<String>,
        #[arg(long, default_value = "GET", requires = "url")]
        method: String,
        /// Gateway mode: the dry run as this client (a name under `clients`).
        #[arg(long, requires = "url")]
        client: Option<String>,
    },
    /// Print a token for a configured identity.
    Token {
        identity: String,
        #[arg(long, short, default_value = "config.yaml")]
        config: PathBuf,
        /// An ID token instead of an access token.
        #[arg(long, requires = "audience")]
        id_token: bool,
        #[arg(long)]
        audience: Option<String>,
    },
    /// Read a password on stdin and print its Argon2 hash, for `clients.NAME.password_hash`.
    HashPassword,
    /// Manage the local CA.
    Ca {
        #[command(subcommand)]
        command: CaCommand,
    },
    /// Print the environment lines that point clients at the proxy and its CA.
    Env {
        #[arg(long, short, default_value = "config.yaml")]
        config: PathBuf,
        /// The syntax: `sh` (export lines), `fish`, or `dotenv` (for containers and manifests).
        #[arg(long, value_enum, default_value = "sh")]
        format: impersonate_proxy::onboard::Format,
    },
    /// Serve the offline Google emulator (IAM Credentials, OAuth2, STS, metadata, tokeninfo).
    Emulator {
        #[arg(long)]
        policy: PathBuf,
        #[arg(long, default_value = "127.0.0.1:8081")]
        listen: std::net::SocketAddr,
    },
    /// Offline demo: emulator, local stand-in origin and the proxy, with requests through it.
    Demo {
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: std::net::SocketAddr,
        /// Exit after the requests instead of serving until Ctrl-C.
        #[arg(long)]
        once: bool,
    },
}

#[derive(Subcommand)]
enum CaCommand {
    /// Create the CA certificate and key (key mode 0600).
    Init {
        #[arg(long, short, default_value = "config.yaml")]
        config: PathBuf,
        /// Replace an existing CA.
        #[arg(long)]
        force: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The demo prints a table: its logs go to a file, named at the top of its output.
    let log_file = matches!(cli.command, Command::Demo { .. })
        .then(|| std::env::temp_dir().join("impersonate-proxy-demo.log"));
    init_tracing(cli.log_format, log_file.as_deref());
    impersonate_proxy::install_crypto_provider();
    // The control plane (token refresh, admin, reload, the emulator and demo commands), on this
    // thread; `run` serves requests on worker threads of its own, a current-thread runtime
    // each. No runtime here is multi-threaded, so tokio is built without that scheduler (and
    // the libm it alone needed): see Cargo.toml.
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Run { config } => cli::run(&config, cli.workers).await,
            Command::Check {
                config,
                url,
                method,
                client,
            } => cli::check(&config, url.as_deref(), &method, client.as_deref()),
            Command::Token {
                identity,
                config,
                id_token,
                audience,
            } => {
                let audience = if id_token { audience } else { None };
                cli::token(&config, &identity, audience.as_deref()).await
            }
            Command::Ca {
                command: CaCommand::Init { config, force },
            } => cli::ca_init(&config, force),
            Command::HashPassword => cli::hash_password(),
            Command::Env { config, format } => cli::env(&config, format),
            Command::Emulator { policy, listen } => cli::emulator(&policy, listen).await,
            Command::Demo { listen, once } => impersonate_proxy::demo::run(listen, once)
                .await
                .map_err(CliError::Other),
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}

/// Logs to stderr, or to `file` (the demo's), falling back to stderr if it cannot be created.
fn init_tracing(format: LogFormat, file: Option<&std::path::Path>) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let writer = match file.map(std::fs::File::create) {
        Some(Ok(f)) => {
            if let Some(path) = file {
                println!("(logs: {})", path.display());
            }
            tracing_subscriber::fmt::writer::BoxMakeWriter::new(std::sync::Mutex::new(f))
        }
        _ => tracing_subscriber::fmt::writer::BoxMakeWriter::new(std::io::stderr),
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(file.is_none())
        .with_writer(writer);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}
