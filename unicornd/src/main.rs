use clap::Parser;

fn main() {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let args = unicornd::Args::parse();
    std::process::exit(unicornd::run(args));
}
