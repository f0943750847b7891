//! `unicorn chat`: a conversation with the model's own chat template.
//!
//! The template is the Jinja text the GGUF file carries (`tokenizer.chat_template`), rendered
//! with minijinja (and its Python-compatible string methods, which the templates use). A model
//! without one gets a built-in template chosen by its architecture: Gemma's turn format for
//! `gemma*` models, ChatML otherwise; `--chat-template` names one or gives a Jinja file. Each
//! turn re-renders the whole conversation and the context keeps the longest prefix it already
//! decoded, so earlier turns are not decoded again.

use std::io::{BufRead, Write};

use anyhow::{anyhow, Result};
use minijinja::{context, Environment, Error as JinjaError, ErrorKind};
use serde::Serialize;

use crate::generate::{generate, SamplingArgs, Session};

/// ChatML, for models that carry no template.
const CHATML: &str = "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

/// Gemma's turns: no system role (a system prompt goes before the first user message), the
/// assistant is `model`.
const GEMMA: &str = "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{% set sys = messages[0]['content'] + '\\n\\n' %}{% set turns = messages[1:] %}{% else %}{% set sys = '' %}{% set turns = messages %}{% endif %}{% for m in turns %}{{ '<start_of_turn>' + ('model' if m['role'] == 'assistant' else m['role']) + '\\n' + (((sys if loop.first else '') + m['content']) | trim) + '<end_of_turn>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}";

/// The template to use: `choice` (a built-in name or a Jinja file), else the model's own, else
/// a built-in by architecture.
pub fn choose(choice: Option<&str>, model_template: &str, arch: &str) -> anyhow::Result<String> {
    match choice {
        Some("chatml") => Ok(CHATML.into()),
        Some("gemma") => Ok(GEMMA.into()),
        Some(path) => std::fs::read_to_string(path).map_err(|e| {
            anyhow!("--chat-template {path:?}: not a built-in (chatml, gemma) and not a readable file: {e}")
        }),
        None if !model_template.trim().is_empty() => Ok(model_template.into()),
        None if arch.starts_with("gemma") => Ok(GEMMA.into()),
        None => Ok(CHATML.into()),
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

/// A model's chat template, compiled.
pub struct Template {
    env: Environment<'static>,
    bos: String,
    eos: String,
}

impl Template {
    pub fn new(source: &str, bos: String, eos: String) -> Result<Template> {
        let mut env = Environment::new();
        minijinja_contrib::add_to_environment(&mut env);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |msg: String| -> Result<String, JinjaError> {
            Err(JinjaError::new(ErrorKind::InvalidOperation, msg))
        });
        env.add_template_owned("chat", source.to_owned())
            .map_err(|e| anyhow!("the model's chat template does not parse: {e}"))?;
        Ok(Template { env, bos, eos })
    }

    /// The conversation as the model expects it, ending with the assistant's turn opened.
    pub fn render(&self, messages: &[Message]) -> Result<String> {
        let t = self.env.get_template("chat").map_err(|e| anyhow!("{e}"))?;
        t.render(context! {
            messages => messages,
            add_generation_prompt => true,
            bos_token => self.bos,
            eos_token => self.eos,
        })
        .map_err(|e| anyhow!("rendering the chat template: {e}"))
    }
}

/// Runs a chat: one turn with `message`, or turns read from stdin until end of input.
pub fn run(
    client: unicorn::Client,
    args: &SamplingArgs,
    system: Option<&str>,
    message: Option<&str>,
    template: Option<&str>,
) -> Result<()> {
    let mut s = Session::open(client, args)?;
    let piece = |id: u32| {
        s.model
            .token_to_piece(id, true)
            .map(|b| String::from_utf8_lossy(b).into_owned())
            .unwrap_or_default()
    };
    let bos =
        if s.model.info().bos == u32::MAX { String::new() } else { piece(s.model.info().bos) };
    let eos =
        if s.model.info().eos == u32::MAX { String::new() } else { piece(s.model.info().eos) };
    let info = s.model.info();
    let source = choose(template, &info.chat_template, &info.arch)?;
    let template = Template::new(&source, bos, eos)?;
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
            Ok(())
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chatml_fallback_and_jinja_features() {
        let t = Template::new(&choose(None, "", "llama").unwrap(), String::new(), String::new())
            .unwrap();
        let out = t
            .render(&[
                Message { role: "system".into(), content: "be brief".into() },
                Message { role: "user".into(), content: "hi".into() },
            ])
            .unwrap();
        assert_eq!(out, "<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n");
        // Python string methods and raise_exception, as Gemma's and other templates use them.
        let t = Template::new(
            "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'tool' %}{{ raise_exception('no tools') }}{% endif %}{{ m['content'] | trim }}|{{ m['role'].upper() }}{% endfor %}",
            "<s>".into(),
            "</s>".into(),
        )
        .unwrap();
        let out = t.render(&[Message { role: "user".into(), content: "  x ".into() }]).unwrap();
        assert_eq!(out, "<s>x|USER");
        let err = t.render(&[Message { role: "tool".into(), content: "y".into() }]).unwrap_err();
        assert!(err.to_string().contains("no tools"), "{err}");
    }

    #[test]
    fn gemma_turns() {
        let source = choose(None, "", "gemma3").unwrap();
        let t = Template::new(&source, "<bos>".into(), "<eos>".into()).unwrap();
        let out = t
            .render(&[
                Message { role: "system".into(), content: "Be brief.".into() },
                Message { role: "user".into(), content: "Hi ".into() },
                Message { role: "assistant".into(), content: "Hello.".into() },
                Message { role: "user".into(), content: "Capital of France?".into() },
            ])
            .unwrap();
        assert_eq!(
            out,
            "<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\nHello.<end_of_turn>\n<start_of_turn>user\nCapital of France?<end_of_turn>\n<start_of_turn>model\n"
        );
        let plain = t.render(&[Message { role: "user".into(), content: "x".into() }]).unwrap();
        assert_eq!(plain, "<bos><start_of_turn>user\nx<end_of_turn>\n<start_of_turn>model\n");
        // The model's own template wins, and names and files can be asked for.
        assert_eq!(choose(None, "{{ x }}", "gemma3").unwrap(), "{{ x }}");
        assert_eq!(choose(Some("chatml"), "{{ x }}", "gemma3").unwrap(), CHATML);
        assert!(choose(Some("/nonexistent/template.jinja"), "", "llama").is_err());
    }
}
