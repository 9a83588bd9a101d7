//! `tidings`: run a node, talk to a running node, or run the demo.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use libp2p::Multiaddr;
use libp2p::multiaddr::Protocol;
use std::sync::Arc;
use tidings_node::api::{
    ADDR_FILE, AddContactBody, CardView, CreateGroupBody, DeviceView, GroupInfoBody, GroupTextBody, InviteBody,
    LinkCodeView, RelaysBody, RoleBody, SendBody, TOKEN_FILE,
};

use prometheus_client::registry::Registry;
use tidings_node::relay::{LogFormat, RelayConfig, RelayMetrics, RelayOptions};
use tidings_node::{ContactView, GroupView, MessageView, NetConfig, Node, NodeConfig, NodeStatus};
use tidings_store::mailbox::Mailboxes;

#[derive(Parser)]
#[command(
    name = "tidings",
    version,
    about = "Tidings: a decentralised, end-to-end encrypted messenger"
)]
struct Cli {
    /// Data directory (default: $XDG_DATA_HOME/tidings).
    #[arg(long, global = true, env = "TIDINGS_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Log filter, e.g. `info` or `tidings_node=debug`.
    #[arg(long, global = true, env = "TIDINGS_LOG", default_value = "warn,libp2p_kad=error")]
    log: String,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Create an identity and a data directory.
    Init {
        /// Your display name.
        #[arg(long, default_value = "")]
        name: String,
        /// Join your existing account as a new device: the code that
        /// `tidings device link` shows on a device you already use.
        #[arg(long, value_name = "CODE")]
        link: Option<String>,
        /// Seal this device's keys under a passphrase from the start (asked
        /// for on the terminal, or read from `--passphrase-file`).
        #[arg(long)]
        passphrase: bool,
        /// Read the passphrase from the first line of this file.
        #[arg(long, value_name = "PATH", env = "TIDINGS_PASSPHRASE_FILE")]
        passphrase_file: Option<PathBuf>,
    },
    /// Start the node (network + local API) and keep it running.
    Run {
        /// Address to listen on (repeatable). Default: all interfaces, TCP and QUIC, any port.
        #[arg(long)]
        listen: Vec<Multiaddr>,
        /// Bootstrap peer, `/ip4/…/tcp/…/p2p/<peer id>` (repeatable).
        #[arg(long)]
        bootstrap: Vec<Multiaddr>,
        /// Address of the local API (loopback only).
        #[arg(long, default_value = "127.0.0.1:0")]
        api: SocketAddr,
        /// Discover peers on the local network with mDNS.
        #[arg(long)]
        mdns: bool,
        /// Whether this device answers DHT queries. `auto`: only when it has no
        /// home relays (with relays, they carry the DHT for it, and a desktop
        /// that comes and goes makes a poor entry in others' routing tables).
        /// `client` for any device others cannot dial.
        #[arg(long, value_enum, default_value_t = DhtRole::Auto)]
        dht: DhtRole,
        /// Home relay, `/ip4/…/tcp/…/p2p/<relay id>` (repeatable; two or more
        /// recommended): your mailboxes live there while you are away, you stay
        /// reachable through its circuits behind a NAT, and your card and user
        /// record name it.
        #[arg(long = "relay", value_name = "MULTIADDR")]
        relays: Vec<Multiaddr>,
        /// Port of the web UI and the API on 127.0.0.1 (sets the port of `--api`).
        #[arg(long, value_name = "PORT")]
        ui_port: Option<u16>,
        /// Open the web UI in the browser (`$BROWSER`, else `xdg-open`), logged in.
        #[arg(long)]
        open: bool,
        /// When the data directory is sealed by a passphrase: read it from the
        /// first line of this file instead of asking on the terminal.
        #[arg(long, value_name = "PATH", env = "TIDINGS_PASSPHRASE_FILE")]
        passphrase_file: Option<PathBuf>,
    },
    /// Print your contact card as a `tidings:` URI and a QR code.
    Card,
    /// API tokens for scripts and bots.
    Token {
        #[command(subcommand)]
        cmd: TokenCmd,
    },
    /// Print a fresh one-time link that logs a browser into the running node's web UI.
    UiLink,
    /// Manage contacts.
    Contact {
        #[command(subcommand)]
        cmd: ContactCmd,
    },
    /// List contacts.
    Contacts,
    /// Send a text message.
    Send { contact: String, text: String },
    /// Show the history with a contact.
    Log { contact: String },
    /// Your account's devices: link a new one, list, revoke.
    Device {
        #[command(subcommand)]
        cmd: DeviceCmd,
    },
    /// Group chats: create, invite, remove, leave, send, read.
    Group {
        #[command(subcommand)]
        cmd: GroupCmd,
    },
    /// Show the node's peer id, addresses, DHT peers and outbox size.
    Status,
    /// Run a community relay: DHT server, circuit relay, AutoNAT server and mailboxes.
    Relay(RelayArgs),
    /// Run a whole local network on loopback and show it working.
    Demo,
    /// Measure latency, throughput, MLS cost, memory and start-up time.
    Bench(tidings_node::bench::BenchArgs),
    /// Measure a community relay: deposit throughput, reconnect drain and latency, memory.
    BenchRelay(tidings_node::bench_relay::BenchRelayArgs),
    /// Measure MLS group operations at growing group sizes, against raw openmls.
    BenchGroups(tidings_node::bench_groups::BenchGroupsArgs),
}

#[derive(clap::Args)]
struct RelayArgs {
    /// Configuration file (TOML). Every setting has a default.
    #[arg(long, env = "TIDINGS_RELAY_CONFIG")]
    config: Option<PathBuf>,
    /// Address to listen on (repeatable; replaces the file's `listen`).
    #[arg(long)]
    listen: Vec<Multiaddr>,
    /// Public address to announce (repeatable; replaces `external_addresses`).
    #[arg(long)]
    external: Vec<Multiaddr>,
    /// Bootstrap peer (repeatable; replaces `bootstrap`).
    #[arg(long)]
    bootstrap: Vec<Multiaddr>,
    /// Prometheus endpoint address, or `off`.
    #[arg(long, env = "TIDINGS_RELAY_METRICS")]
    metrics: Option<String>,
    /// Log as JSON lines.
    #[arg(long)]
    json_logs: bool,
    /// Override any setting of the file: `--set mailbox.retention_ms=86400000`
    /// (repeatable). Environment variables `TIDINGS_RELAY__<KEY>` do the same,
    /// with `__` between sections: `TIDINGS_RELAY__MAILBOX__RETENTION_MS=86400000`.
    /// Precedence: flags, then `--set`, then the environment, then the file.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
    /// Print the effective configuration as TOML and exit.
    #[arg(long)]
    print_config: bool,
}

#[derive(Subcommand)]
enum TokenCmd {
    /// Make an API token for a script or bot and print it (shown once).
    Create {
        /// What it may do: `read` (every GET and the event streams), `send`
        /// (sending messages only) or `full`.
        #[arg(long)]
        scope: String,
        /// A name to recognise it by.
        #[arg(long, default_value = "")]
        name: String,
    },
}

/// A device's part in the DHT (`tidings run --dht`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum DhtRole {
    /// A server without home relays, a client with them.
    Auto,
    Server,
    Client,
}

impl DhtRole {
    fn is_server(self, has_home_relays: bool) -> bool {
        match self {
            DhtRole::Auto => !has_home_relays,
            DhtRole::Server => true,
            DhtRole::Client => false,
        }
    }
}

#[derive(Subcommand)]
enum DeviceCmd {
    /// Show a code (valid five minutes) for `tidings init --link <code>` on a new device.
    Link,
    /// List this account's devices.
    List,
    /// Remove a lost device from every group and from your user record.
    Revoke { device: String },
}

#[derive(Subcommand)]
enum GroupCmd {
    /// Create a group on your home relays, inviting contacts.
    Create {
        name: String,
        /// A contact to invite (repeatable).
        #[arg(long = "member")]
        members: Vec<String>,
    },
    /// List your groups.
    List,
    /// Show a group's members, roles and relays.
    Members { group: String },
    /// Invite contacts (admins).
    Invite { group: String, contacts: Vec<String> },
    /// Remove a member (admins).
    Remove { group: String, member: String },
    /// Leave a group.
    Leave { group: String },
    /// Send a text to a group.
    Send { group: String, text: String },
    /// Show a group's history.
    Log { group: String },
    /// Rename a group or change its description (admins).
    Rename {
        group: String,
        name: String,
        #[arg(long)]
        description: Option<String>,
    },
    /// Move a group to other relays (admins); the first one sequences its changes.
    Move {
        group: String,
        /// Relay addresses, `/ip4/…/tcp/…/p2p/<relay id>`.
        #[arg(required = true)]
        relays: Vec<String>,
    },
    /// Give a member a role: owner (transfers ownership), admin or member (owner only).
    Role {
        group: String,
        member: String,
        role: String,
    },
}

#[derive(Subcommand)]
enum ContactCmd {
    /// Add a contact from a `tidings:` card or an account key.
    Add {
        card: String,
        #[arg(long)]
        name: Option<String>,
    },
}

/// Prints a line to stdout; a closed pipe (`tidings card | head -1`) ends the
/// program quietly instead of panicking.
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        if writeln!(std::io::stdout().lock(), $($arg)*).is_err() {
            std::process::exit(0);
        }
    }};
}

/// Prints a line to stdout, ignoring a closed pipe (for the long-running `run`).
macro_rules! note {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout().lock(), $($arg)*);
    }};
}

fn main() -> ExitCode {
    // Errors are reported as one line; a bug should be too, not as a backtrace.
    std::panic::set_hook(Box::new(|info| {
        eprintln!("error: internal error: {info}");
    }));
    let cli = Cli::parse();
    if let Cmd::Relay(args) = &cli.cmd {
        return relay_main(args, cli.data_dir.clone());
    }
    let filter = tracing_subscriber::EnvFilter::try_new(&cli.log).unwrap_or_else(|_| "warn,libp2p_kad=error".into());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(dispatch(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn data_dir(cli: &Option<PathBuf>) -> anyhow::Result<PathBuf> {
    match cli {
        Some(d) => Ok(d.clone()),
        None => Ok(dirs::data_dir()
            .context("no data directory for this user; pass --data-dir")?
            .join("tidings")),
    }
}

async fn dispatch(cli: Cli) -> anyhow::Result<()> {
    match cli.cmd {
        Cmd::Demo => return tidings_node::demo::run().await,
        Cmd::Bench(args) => return tidings_node::bench::run(args).await,
        Cmd::BenchRelay(args) => return tidings_node::bench_relay::run(args).await,
        Cmd::BenchGroups(args) => return tidings_node::bench_groups::run(args).await,
        _ => {}
    }
    let dir = data_dir(&cli.data_dir)?;
    match cli.cmd {
        Cmd::Init {
            name,
            link,
            passphrase,
            passphrase_file,
        } => {
            let sealed_with = if passphrase || passphrase_file.is_some() {
                Some(new_passphrase(passphrase_file.as_deref())?)
            } else {
                None
            };
            match link {
                None => init(&dir, &name, sealed_with.as_deref()),
                Some(code) => init_linked(&dir, &code, sealed_with.as_deref()).await,
            }
        }
        Cmd::Device { cmd } => device_cmd(&dir, cmd).await,
        Cmd::Token { cmd } => token_cmd(&dir, cmd).await,
        Cmd::UiLink => {
            #[derive(serde::Deserialize)]
            struct Link {
                url: String,
            }
            let link: Link = Client::new(&dir)?
                .post("/api/login-codes", &serde_json::json!({}))
                .await?;
            out!("open {}", link.url);
            Ok(())
        }
        Cmd::Run {
            listen,
            bootstrap,
            api,
            mdns,
            dht,
            relays,
            ui_port,
            open,
            passphrase_file,
        } => {
            let mut api = api;
            if let Some(port) = ui_port {
                api.set_port(port);
            }
            let store = open_unlocked(&dir, passphrase_file.as_deref())?;
            run(&dir, store, listen, bootstrap, api, mdns, dht, relays, open).await
        }
        Cmd::Card => {
            let card: CardView = Client::new(&dir)?.get("/api/card").await?;
            out!("{}\n", card.uri);
            out!("{}", qr(&card.uri)?);
            out!("account: {}  name: {}", card.account, card.name);
            Ok(())
        }
        Cmd::Contact {
            cmd: ContactCmd::Add { card, name },
        } => {
            let c: ContactView = Client::new(&dir)?
                .post("/api/contacts", &AddContactBody { card, name })
                .await?;
            out!("added {} ({})", display_name(&c), c.account);
            Ok(())
        }
        Cmd::Contacts => {
            let list: Vec<ContactView> = Client::new(&dir)?.get("/api/contacts").await?;
            for c in list {
                out!("{:<20} {}  devices: {}", display_name(&c), c.account, c.devices);
            }
            Ok(())
        }
        Cmd::Send { contact, text } => {
            let m: MessageView = Client::new(&dir)?
                .post("/api/messages", &SendBody { contact, text })
                .await?;
            out!("queued {} (state: {:?})", m.id, m.state);
            Ok(())
        }
        Cmd::Log { contact } => {
            let path = format!("/api/contacts/{contact}/messages");
            let list: Vec<MessageView> = Client::new(&dir)?.get(&path).await?;
            for m in list {
                let who = if m.outgoing { "me" } else { "them" };
                out!("{} {:>4} {:?}: {}", format_ts(m.timestamp_ms), who, m.state, m.text);
            }
            Ok(())
        }
        Cmd::Group { cmd } => group_cmd(&dir, cmd).await,
        Cmd::Status => {
            let s: NodeStatus = Client::new(&dir)?.get("/api/status").await?;
            out!("account:   {} ({})", s.account, s.name);
            out!("peer id:   {}", s.peer_id);
            for a in &s.listen_addrs {
                out!("listening: {a}");
            }
            out!("connected: {} peers", s.connected_peers);
            out!("DHT peers: {}", s.dht_peers);
            out!("outbox:    {} envelopes", s.outbox);
            for r in &s.home_relays {
                out!("relay:     {r}");
            }
            if s.home_relays.len() < 2 {
                out!(
                    "warning:   {} home relay(s): mail for you waits with fewer than two operators; add relays with `tidings run --relay <addr>`",
                    s.home_relays.len()
                );
            }
            for r in &s.deposit_refusals {
                out!(
                    "refused:   relay {} holds no mail for {}: {} ({}x, last {})",
                    r.relay,
                    r.contact,
                    r.code,
                    r.count,
                    format_ts(r.last_ms)
                );
            }
            for g in &s.mail_missing {
                let inbox = if g.request_inbox { "request inbox" } else { "inbox" };
                out!(
                    "MISSING:   relay {} skipped {inbox} indices {}..={} (found {}); senders hold its receipts",
                    g.relay,
                    g.from,
                    g.to,
                    format_ts(g.detected_ms)
                );
            }
            Ok(())
        }
        Cmd::Demo | Cmd::Bench(_) | Cmd::BenchRelay(_) | Cmd::BenchGroups(_) | Cmd::Relay(_) => Ok(()),
    }
}

async fn group_cmd(dir: &Path, cmd: GroupCmd) -> anyhow::Result<()> {
    let client = Client::new(dir)?;
    let show = |g: &GroupView| {
        let state = if g.left { " (you left)" } else { "" };
        out!("{}  {}{state}  epoch {}", g.id, g.name, g.epoch);
        for m in &g.members {
            out!("  {:<7} {}  devices: {}", m.role, m.account, m.devices);
        }
    };
    match cmd {
        GroupCmd::Create { name, members } => {
            let g: GroupView = client.post("/api/groups", &CreateGroupBody { name, members }).await?;
            show(&g);
        }
        GroupCmd::List => {
            let list: Vec<GroupView> = client.get("/api/groups").await?;
            for g in &list {
                show(g);
            }
        }
        GroupCmd::Members { group } => {
            let g: GroupView = client.get(&format!("/api/groups/{group}")).await?;
            show(&g);
            for r in &g.relays {
                out!("  relay   {r}");
            }
        }
        GroupCmd::Invite { group, contacts } => {
            let g: GroupView = client
                .post(&format!("/api/groups/{group}/members"), &InviteBody { contacts })
                .await?;
            show(&g);
        }
        GroupCmd::Remove { group, member } => {
            let g: GroupView = client.delete(&format!("/api/groups/{group}/members/{member}")).await?;
            show(&g);
        }
        GroupCmd::Leave { group } => {
            let card: CardView = client.get("/api/card").await?;
            let _: GroupView = client
                .delete(&format!("/api/groups/{group}/members/{}", card.account))
                .await?;
            out!("left {group}");
        }
        GroupCmd::Send { group, text } => {
            let m: MessageView = client
                .post(&format!("/api/groups/{group}/messages"), &GroupTextBody { text })
                .await?;
            out!("queued {} (state: {:?})", m.id, m.state);
        }
        GroupCmd::Log { group } => {
            let list: Vec<MessageView> = client.get(&format!("/api/groups/{group}/messages")).await?;
            for m in list {
                let who = if m.outgoing {
                    "me".to_owned()
                } else {
                    m.sender.chars().take(8).collect()
                };
                out!("{} {:>8}: {}", format_ts(m.timestamp_ms), who, m.text);
            }
        }
        GroupCmd::Rename {
            group,
            name,
            description,
        } => {
            let g: GroupView = client
                .post(
                    &format!("/api/groups/{group}/info"),
                    &GroupInfoBody {
                        name: Some(name),
                        description,
                    },
                )
                .await?;
            show(&g);
        }
        GroupCmd::Move { group, relays } => {
            let g: GroupView = client
                .post(&format!("/api/groups/{group}/relays"), &RelaysBody { relays })
                .await?;
            show(&g);
        }
        GroupCmd::Role { group, member, role } => {
            let g: GroupView = client
                .post(&format!("/api/groups/{group}/roles"), &RoleBody { member, role })
                .await?;
            show(&g);
        }
    }
    Ok(())
}

fn display_name(c: &ContactView) -> &str {
    if c.name.is_empty() { "(no name)" } else { &c.name }
}

fn format_ts(ms: u64) -> String {
    let secs = ms / 1000;
    let (h, m, s) = ((secs / 3600) % 24, (secs / 60) % 60, secs % 60);
    format!("{h:02}:{m:02}:{s:02}Z")
}

fn qr(text: &str) -> anyhow::Result<String> {
    let code = qrcode::QrCode::new(text.as_bytes())?;
    Ok(code
        .render::<qrcode::render::unicode::Dense1x2>()
        .dark_color(qrcode::render::unicode::Dense1x2::Light)
        .light_color(qrcode::render::unicode::Dense1x2::Dark)
        .build())
}

fn init(dir: &Path, name: &str, passphrase: Option<&str>) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let store = tidings_node::open_store(dir)?;
    if store.has_identity()? {
        bail!("{} already holds an identity", dir.display());
    }
    // Sealed before the first secret is written, so none ever reaches the disk in the clear.
    if let Some(p) = passphrase {
        store.set_passphrase(None, Some(p))?;
    }
    let now = tidings_node::Clock::system().now_ms();
    tidings_node::create_identity(&store, name, now)?;
    write_token(dir)?;
    let id = store.identity()?;
    let account = tidings_protocol::AccountKey::from_seed(id.account_seed).id();
    out!("created identity {account} in {}", dir.display());
    Ok(())
}

async fn init_linked(dir: &Path, code: &str, passphrase: Option<&str>) -> anyhow::Result<()> {
    let joined = tidings_node::link::join_account(dir, code, &tidings_node::Clock::system(), passphrase).await?;
    write_token(dir)?;
    let account = tidings_protocol::AccountKey::from_seed(joined.identity.account_seed).id();
    out!("joined account {account} as a new device in {}", dir.display());
    out!(
        "  {} contacts and {} history rows came over",
        joined.contacts,
        joined.history
    );
    out!("  your other device adds this one to your groups once it runs; start it with:");
    let relays: Vec<String> = joined.relays.iter().map(|r| format!(" --relay {r}")).collect();
    out!("  tidings --data-dir {} run{}", dir.display(), relays.concat());
    Ok(())
}

async fn device_cmd(dir: &Path, cmd: DeviceCmd) -> anyhow::Result<()> {
    let client = Client::new(dir)?;
    match cmd {
        DeviceCmd::Link => {
            let code: LinkCodeView = client.post("/api/devices/link", &serde_json::json!({})).await?;
            out!("On the new device, within five minutes:\n");
            out!("  tidings init --link {}\n", code.code);
            out!("{}", qr(&code.code)?);
        }
        DeviceCmd::List => {
            let list: Vec<DeviceView> = client.get("/api/devices").await?;
            for d in list {
                let this = if d.this_device { "  (this device)" } else { "" };
                out!("{}  since {}{this}", d.device, format_ts(d.created_ms));
            }
        }
        DeviceCmd::Revoke { device } => {
            let r: serde_json::Value = client.delete(&format!("/api/devices/{device}")).await?;
            out!(
                "revoked; removed from {} groups",
                r.get("groups").and_then(|g| g.as_u64()).unwrap_or(0)
            );
        }
    }
    Ok(())
}

/// `tidings token create`: through the running node's API, or straight into
/// the store when no node runs.
async fn token_cmd(dir: &Path, cmd: TokenCmd) -> anyhow::Result<()> {
    let TokenCmd::Create { scope, name } = cmd;
    let Some(parsed) = tidings_node::api::parse_scope(&scope) else {
        bail!("--scope must be read, send or full");
    };
    if name.len() > 64 {
        bail!("--name is at most 64 bytes");
    }
    let token = match Client::new(dir) {
        Ok(client) => {
            let v: serde_json::Value = client
                .post("/api/tokens", &serde_json::json!({ "scope": scope, "name": name }))
                .await?;
            v.get("token")
                .and_then(|t| t.as_str())
                .map(str::to_owned)
                .ok_or_else(|| anyhow::anyhow!("the node gave no token"))?
        }
        Err(_) => {
            let store = tidings_node::open_store(dir)
                .with_context(|| format!("cannot open the data directory {}", dir.display()))?;
            if !store.has_identity()? {
                bail!("no identity in {}; run `tidings init` first", dir.display());
            }
            let now = tidings_node::Clock::system().now_ms();
            tidings_node::api::create_token(&store, parsed, &name, now)?
        }
    };
    out!("{token}");
    Ok(())
}

fn write_token(dir: &Path) -> anyhow::Result<String> {
    let mut bytes = [0u8; 32];
    getrandom::getrandom(&mut bytes).context("no OS randomness")?;
    let token = hex::encode(bytes);
    let path = dir.join(TOKEN_FILE);
    write_private(&path, &token)?;
    Ok(token)
}

fn write_private(path: &Path, contents: &str) -> anyhow::Result<()> {
    use std::io::Write;
    #[cfg(unix)]
    use std::os::unix::fs::OpenOptionsExt;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    opts.mode(0o600);
    let mut f = opts
        .open(path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    f.write_all(contents.as_bytes())?;
    Ok(())
}

/// A passphrase from the first line of `file`, else asked on the terminal.
fn read_passphrase(file: Option<&Path>, prompt: &str) -> anyhow::Result<String> {
    use std::io::IsTerminal as _;
    if let Some(path) = file {
        let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
        return Ok(text.lines().next().unwrap_or("").to_owned());
    }
    if !std::io::stdin().is_terminal() {
        bail!("the data directory is sealed by a passphrase: run in a terminal, or pass --passphrase-file");
    }
    Ok(rpassword::prompt_password(prompt)?)
}

/// A new passphrase: from `file`, or asked twice on the terminal.
fn new_passphrase(file: Option<&Path>) -> anyhow::Result<String> {
    let p = read_passphrase(file, "New passphrase: ")?;
    tidings_store::seal::check_passphrase(&p)?;
    if file.is_none() && read_passphrase(None, "Again: ")? != p {
        bail!("the two passphrases differ");
    }
    Ok(p)
}

/// Opens the data directory's store, asking for its passphrase if it has one
/// (three tries on a terminal).
fn open_unlocked(dir: &Path, file: Option<&Path>) -> anyhow::Result<tidings_store::Store> {
    let store =
        tidings_node::open_store(dir).with_context(|| format!("cannot open the data directory {}", dir.display()))?;
    let tries = if file.is_some() { 1 } else { 3 };
    for left in (0..tries).rev() {
        if !store.is_locked()? {
            break;
        }
        let p = read_passphrase(file, "Passphrase: ")?;
        match store.unlock(&p) {
            Ok(()) => break,
            Err(tidings_store::StoreError::WrongPassphrase) if left > 0 => eprintln!("wrong passphrase"),
            Err(e) => return Err(e.into()),
        }
    }
    Ok(store)
}

#[allow(clippy::too_many_arguments)]
async fn run(
    dir: &Path,
    store: tidings_store::Store,
    listen: Vec<Multiaddr>,
    bootstrap: Vec<Multiaddr>,
    api: SocketAddr,
    mdns: bool,
    dht: DhtRole,
    flag_relays: Vec<Multiaddr>,
    open: bool,
) -> anyhow::Result<()> {
    for r in &flag_relays {
        if tidings_node::net::peer_of(r).is_none() {
            bail!("relay address {r} must end in /p2p/<relay id>");
        }
    }
    // `--relay` replaces the saved home relays; without it the saved ones
    // (last set here or in the web UI) are used.
    let mut settings = store.settings()?;
    let saved: Option<Vec<Multiaddr>> = settings
        .home_relays
        .as_ref()
        .map(|list| list.iter().filter_map(|a| a.parse().ok()).collect());
    let (home_relays, change_to) = match saved {
        Some(saved) if flag_relays.is_empty() || saved == flag_relays => (saved, None),
        // Started on the saved ones and then changed, so that contacts hear
        // of the change and the old ones are still drained for a while.
        Some(saved) => (saved, Some(flag_relays)),
        None => {
            if !flag_relays.is_empty() {
                settings.home_relays = Some(flag_relays.iter().map(ToString::to_string).collect());
                store.put_settings(&settings)?;
            }
            (flag_relays, None)
        }
    };
    let wanted = change_to.as_ref().unwrap_or(&home_relays);
    if wanted.len() < 2 {
        tracing::warn!(
            relays = wanted.len(),
            "fewer than two home relays: mail for you while you are away rests with a single operator, or none; \
             pass --relay twice"
        );
    }
    store
        .identity()
        .with_context(|| format!("no identity in {}; run `tidings init` first", dir.display()))?;
    let token = match std::fs::read_to_string(dir.join(TOKEN_FILE)) {
        Ok(t) if !t.trim().is_empty() => t.trim().to_owned(),
        _ => write_token(dir)?,
    };
    let mut net = NetConfig {
        bootstrap,
        mdns,
        dht_server: dht.is_server(!home_relays.is_empty()),
        ..NetConfig::default()
    };
    if !listen.is_empty() {
        net.listen = listen;
    }
    let node = Node::start(
        store,
        NodeConfig {
            net,
            home_relays,
            ..NodeConfig::default()
        },
    )
    .await?;
    let handle = node.handle();
    if let Some(relays) = change_to {
        let relays: Vec<String> = relays.iter().map(ToString::to_string).collect();
        handle.set_home_relays(&relays).await?;
        note!("home relays changed to {}", relays.join(", "));
    }
    let served = tidings_node::api::serve_api(handle.clone(), api, &token).await?;
    let login = served.login_url(tidings_node::Clock::system().now_ms());
    let (api_addr, api_task) = (served.addr, served.task);
    write_private(&dir.join(ADDR_FILE), &api_addr.to_string())?;
    let publisher = handle.spawn_record_publisher(Duration::from_secs(3600));
    handle.reconnect_contacts().await;
    note!("tidings node {} ({})", handle.account(), handle.name());
    for a in node.listen_addrs() {
        note!("listening on {a}");
    }
    note!("API on http://{api_addr}");
    note!("open {login}");
    if open {
        open_ui(api_addr, &token).await;
    }
    wait_for_signal().await;
    note!("shutting down");
    publisher.abort();
    api_task.abort();
    node.shutdown().await;
    let _ = std::fs::remove_file(dir.join(ADDR_FILE));
    Ok(())
}

/// Opens the web UI in the browser with a fresh login link (`--open`). Any
/// failure only prints the link.
async fn open_ui(api_addr: SocketAddr, token: &str) {
    let url = login_url(api_addr, token)
        .await
        .unwrap_or_else(|| format!("http://{api_addr}/"));
    let browser = std::env::var("BROWSER")
        .ok()
        .and_then(|b| b.split(':').map(str::trim).find(|b| !b.is_empty()).map(str::to_owned));
    let program = browser.unwrap_or_else(|| if cfg!(target_os = "macos") { "open" } else { "xdg-open" }.to_owned());
    let spawned = std::process::Command::new(&program)
        .arg(&url)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn();
    match spawned {
        Ok(mut child) => {
            note!("opening the web UI with {program}");
            // `xdg-open` fails when no browser is set up; a browser may run until closed.
            tokio::task::spawn_blocking(move || match child.wait() {
                Ok(status) if status.success() => {}
                _ => note!("{program} could not open the web UI; open {url} in your browser"),
            });
        }
        Err(e) => note!("cannot start {program} ({e}); open {url} in your browser"),
    }
}

/// A one-time login link from our own API, if it hands them out.
async fn login_url(api_addr: SocketAddr, token: &str) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct LoginLink {
        url: String,
    }
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .ok()?;
    let resp = http
        .post(format!("http://{api_addr}/api/login-codes"))
        .bearer_auth(token)
        .json(&serde_json::json!({}))
        .send()
        .await
        .ok()?;
    if !resp.status().is_success() {
        return None;
    }
    resp.json::<LoginLink>().await.ok().map(|l| l.url)
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        // SIGHUP (a closed terminal, or `systemctl reload`) must not kill a
        // node: settings are read at start, so it is only logged.
        let mut hup = signal(SignalKind::hangup()).ok();
        match signal(SignalKind::terminate()) {
            Ok(mut term) => loop {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => break,
                    _ = term.recv() => break,
                    Some(()) = async {
                        match hup.as_mut() {
                            Some(h) => h.recv().await,
                            None => std::future::pending().await,
                        }
                    } => tracing::info!("SIGHUP ignored: settings are read at start; restart to change them"),
                }
            },
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// A client of a running node's API.
struct Client {
    base: String,
    token: String,
    http: reqwest::Client,
}

impl Client {
    fn new(dir: &Path) -> anyhow::Result<Self> {
        let addr = std::fs::read_to_string(dir.join(ADDR_FILE)).map_err(|_| {
            anyhow::anyhow!(
                "no node is running for {} (start one with `tidings run`)",
                dir.display()
            )
        })?;
        let token = std::fs::read_to_string(dir.join(TOKEN_FILE))
            .with_context(|| format!("cannot read the API token in {}", dir.display()))?;
        Ok(Self {
            base: format!("http://{}", addr.trim()),
            token: token.trim().to_owned(),
            http: reqwest::Client::builder().timeout(Duration::from_secs(60)).build()?,
        })
    }

    async fn finish<T: serde::de::DeserializeOwned>(resp: reqwest::Response) -> anyhow::Result<T> {
        let status = resp.status();
        let body = resp.bytes().await?;
        if !status.is_success() {
            let msg = serde_json::from_slice::<serde_json::Value>(&body)
                .ok()
                .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_owned))
                .unwrap_or_else(|| String::from_utf8_lossy(&body).into_owned());
            bail!("{msg}");
        }
        Ok(serde_json::from_slice(&body)?)
    }

    async fn get<T: serde::de::DeserializeOwned>(&self, path: &str) -> anyhow::Result<T> {
        let resp = self
            .http
            .get(format!("{}{path}", self.base))
            .bearer_auth(&self.token)
            .send()
            .await
            .context("cannot reach the node (is `tidings run` still running?)")?;
        Self::finish(resp).await
    }

    async fn delete<T: serde::de::DeserializeOwned>(&self, path: &str) -> anyhow::Result<T> {
        let resp = self
            .http
            .delete(format!("{}{path}", self.base))
            .bearer_auth(&self.token)
            .send()
            .await
            .context("cannot reach the node (is `tidings run` still running?)")?;
        Self::finish(resp).await
    }

    async fn post<B: serde::Serialize, T: serde::de::DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> anyhow::Result<T> {
        let resp = self
            .http
            .post(format!("{}{path}", self.base))
            .bearer_auth(&self.token)
            .json(body)
            .send()
            .await
            .context("cannot reach the node (is `tidings run` still running?)")?;
        Self::finish(resp).await
    }
}

fn relay_config(args: &RelayArgs, data_dir: Option<PathBuf>) -> anyhow::Result<RelayConfig> {
    let mut cfg = match &args.config {
        Some(path) => {
            let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
            RelayConfig::from_toml(&text).with_context(|| format!("invalid configuration in {}", path.display()))?
        }
        None => RelayConfig::default(),
    };
    let env: Vec<(String, String)> = std::env::vars()
        .filter_map(|(k, v)| {
            let key = k.strip_prefix("TIDINGS_RELAY__")?;
            Some((key.to_lowercase().replace("__", "."), v))
        })
        .collect();
    cfg = cfg
        .with_overrides(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .context("invalid TIDINGS_RELAY__ environment variable")?;
    let mut sets = Vec::new();
    for s in &args.set {
        let (k, v) = s
            .split_once('=')
            .with_context(|| format!("--set {s:?}: expected KEY=VALUE"))?;
        sets.push((k.trim(), v.trim()));
    }
    cfg = cfg.with_overrides(sets).context("invalid --set")?;
    if let Some(d) = data_dir {
        cfg.data_dir = d;
    }
    if !args.listen.is_empty() {
        cfg.listen = args.listen.iter().map(|a| a.to_string()).collect();
    }
    if !args.external.is_empty() {
        cfg.external_addresses = args.external.iter().map(|a| a.to_string()).collect();
    }
    if !args.bootstrap.is_empty() {
        cfg.bootstrap = args.bootstrap.iter().map(|a| a.to_string()).collect();
    }
    if let Some(m) = &args.metrics {
        cfg.metrics = m.clone();
    }
    if args.json_logs {
        cfg.log_format = LogFormat::Json;
    }
    cfg.validate().context("invalid relay configuration")?;
    Ok(cfg)
}

fn parse_addrs(list: &[String], what: &str) -> anyhow::Result<Vec<Multiaddr>> {
    list.iter()
        .map(|a| {
            a.parse::<Multiaddr>()
                .with_context(|| format!("invalid {what} address {a:?}"))
        })
        .collect()
}

fn relay_main(args: &RelayArgs, data_dir: Option<PathBuf>) -> ExitCode {
    let cfg = match relay_config(args, data_dir) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    if args.print_config {
        out!("{}", cfg.to_toml());
        return ExitCode::SUCCESS;
    }
    let filter = tracing_subscriber::EnvFilter::try_new(&cfg.log).unwrap_or_else(|_| "info".into());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match cfg.log_format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run_relay(cfg)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Whether a listen address binds one specific IP (not `0.0.0.0` or `::`).
fn names_specific_ip(addr: &Multiaddr) -> bool {
    match addr.iter().next() {
        Some(Protocol::Ip4(ip)) => !ip.is_unspecified(),
        Some(Protocol::Ip6(ip)) => !ip.is_unspecified(),
        _ => false,
    }
}

async fn run_relay(cfg: RelayConfig) -> anyhow::Result<()> {
    std::fs::create_dir_all(&cfg.data_dir).with_context(|| format!("cannot create {}", cfg.data_dir.display()))?;
    let store = tidings_node::open_store(&cfg.data_dir)
        .with_context(|| format!("cannot open the data directory {}", cfg.data_dir.display()))?;
    if store.is_locked()? {
        bail!("the relay's data directory is sealed by a passphrase; relays run unattended, without one");
    }
    if !store.has_identity()? {
        tidings_node::create_identity(&store, "relay", tidings_node::Clock::system().now_ms())?;
    }
    let mailboxes = Arc::new(
        Mailboxes::open(&cfg.data_dir.join("mailboxes.redb"), cfg.mailbox.clone())
            .context("cannot open the mailbox database")?,
    );
    let registry = Arc::new(std::sync::Mutex::new(Registry::default()));
    let metrics = match registry.lock() {
        Ok(mut r) => RelayMetrics::register(&mut r),
        Err(_) => bail!("metrics registry poisoned"),
    };
    let listen = parse_addrs(&cfg.listen, "listen")?;
    let external_addrs = parse_addrs(&cfg.external_addresses, "external")?;
    // A relay grants circuit reservations only once it has an external address:
    // the configured ones, else its listen addresses when they name a specific IP.
    let announce_listen_addrs = external_addrs.is_empty() && listen.iter().all(names_specific_ip);
    if external_addrs.is_empty() && !announce_listen_addrs {
        tracing::warn!(
            "no external_addresses configured: circuit reservations wait until AutoNAT confirms a public address"
        );
    }
    let net = NetConfig {
        listen,
        bootstrap: parse_addrs(&cfg.bootstrap, "bootstrap")?,
        external_addrs,
        relay_server: Some(cfg.circuits.clone()),
        dht_server: true,
        announce_listen_addrs,
        ..NetConfig::default()
    };
    let relay = RelayOptions {
        mailboxes,
        pow_bits: cfg.pow_bits,
        key_package_claims_per_minute: cfg.key_package_claims_per_minute,
        request_deposits_per_minute: cfg.request_deposits_per_minute,
        request_deposits_per_ip_per_minute: cfg.request_deposits_per_ip_per_minute,
        sweep_interval: Duration::from_secs(cfg.sweep_interval_secs.max(1)),
        metrics,
    };
    let node = Node::start(
        store,
        NodeConfig {
            net,
            relay: Some(relay),
            metrics: Some(registry.clone()),
            ..NodeConfig::default()
        },
    )
    .await?;
    let metrics_task = match cfg.metrics_addr()? {
        Some(addr) => {
            let (bound, task) = tidings_node::relay::serve_metrics(addr, registry).await?;
            note!("metrics on http://{bound}/metrics");
            Some(task)
        }
        None => None,
    };
    note!("tidings relay {}", node.handle().peer_id());
    for a in node.listen_addrs() {
        note!("listening on {a}");
    }
    wait_for_signal().await;
    note!("shutting down");
    if let Some(t) = metrics_task {
        t.abort();
    }
    node.shutdown().await;
    Ok(())
}
