//! `stockflow accounts check`: reads the accounting connector's configured accounts back from
//! the vendor (QuickBooks by Id, Xero by code) and says which are missing, inactive or of a type
//! journals cannot use — before the first journal is refused.

use std::process::ExitCode;

use crate::runtime::config::Settings;

/// Arguments of `stockflow accounts`.
#[derive(Debug, clap::Args)]
pub struct AccountsArgs {
    #[command(subcommand)]
    action: AccountsAction,
}

#[derive(Debug, clap::Subcommand)]
enum AccountsAction {
    /// One line per configured account (cogs, inventory, clearing): its name and type in the
    /// books, or what is wrong. Exits 1 when any is wrong.
    Check,
}

/// Runs `stockflow accounts`.
pub async fn run(args: AccountsArgs, settings: &Settings) -> anyhow::Result<ExitCode> {
    let AccountsAction::Check = args.action;
    let connectors = crate::runtime::connectors::Connectors::build(
        &settings.connectors,
        settings.engine.windows.allowed_lateness_ms(),
    )
    .await?;
    let Some(accounting) = connectors.accounting else {
        anyhow::bail!("no accounting connector is configured (connectors.accounting.url)");
    };
    let checks = accounting.check_accounts().await.map_err(|e| anyhow::anyhow!("reading the accounts: {e}"))?;
    println!("{:<10} {:<10} {:<32} {:<26} result", "role", "account", "name", "type");
    let mut ok = true;
    for c in &checks {
        let (name, kind) = c.found.clone().unwrap_or_else(|| ("-".into(), "-".into()));
        ok &= c.problem.is_none();
        println!("{:<10} {:<10} {:<32} {:<26} {}", c.role, c.account, name, kind, c.problem.as_deref().unwrap_or("ok"));
    }
    Ok(if ok { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}
