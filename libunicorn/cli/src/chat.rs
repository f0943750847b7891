//! `unicorn chat`: a conversation with the model's chat template (`unicorn_generate::template`:
//! the model's own, else a built-in by architecture; `--chat-template` names one or gives a
//! Jinja file). Each turn re-renders the whole conversation and the context keeps the longest
//! prefix it already decoded, so earlier turns are not decoded again.

use std::io::{BufRead, Write};
use std::ops::ControlFlow;

use anyhow::Result;
use unicorn_generate::{generate, Message, Template};

use crate::generate::{open_session, SamplingArgs};

/// Runs a chat: one turn with `message`, or turns read from stdin until end of input.
pub fn run(
    client: unicorn::Client,
    args: &SamplingArgs,
    system: Option<&str>,
    message: Option<&str>,
    template: Option<&str>,
) -> Result<()> {
    let mut s = open_session(client, args)?;
    let template = Template::for_model(&s.model, template)?;
    let mut messages = Vec::new();
    if let Some(sys) = system {
        messages.push(Message { role: "system".into(), content: sys.into() });
    }
    let interactive = message.is_none();
    let stdin = std::io::stdin();
    let mut lines = stdin.lock().lines();
    loop {
        let user = match message {
            Some(m) if messages.iter().all(|m: &Message| m.role != "user") => m.to_owned(),
            Some(_) => return Ok(()),
            None => {
                eprint!("> ");
                std::io::stderr().flush()?;
                match lines.next() {
                    None => return Ok(()),
                    Some(line) => line?,
                }
            }
        };
        if user.trim().is_empty() {
            continue;
        }
        messages.push(Message { role: "user".into(), content: user });
        let prompt = template.render(&messages)?;
        // The rendered template already holds BOS where the model wants it.
        let ids = s.tokenize(&prompt, false)?;
        let stdout = std::io::stdout();
        let mut out = stdout.lock();
        let g = generate(&mut s, &ids, args.n_predict, args.ignore_eos, |_, piece| {
            write!(out, "{piece}")?;
            out.flush()?;
            anyhow::Ok(ControlFlow::Continue(()))
        })?;
        writeln!(out)?;
        if interactive {
            eprintln!("[{}]", g.report());
        } else {
            eprintln!("{}", g.report());
        }
        messages.push(Message { role: "assistant".into(), content: g.text.trim().to_owned() });
    }
}
