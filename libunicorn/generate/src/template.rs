//! Chat templates: the Jinja text a GGUF file carries (`tokenizer.chat_template`), rendered with
//! minijinja (and its Python-compatible string methods, which the templates use). A model
//! without one gets a built-in template chosen by its architecture: Gemma's turn format for
//! `gemma*` models, ChatML otherwise.

use minijinja::{context, Environment, Error as JinjaError, ErrorKind};
use serde::Serialize;
use unicorn::Model;

use crate::{Error, Result};

/// ChatML, for models that carry no template.
const CHATML: &str = "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

/// Gemma's turns: no system role (a system prompt goes before the first user message), the
/// assistant is `model`.
const GEMMA: &str = "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{% set sys = messages[0]['content'] + '\\n\\n' %}{% set turns = messages[1:] %}{% else %}{% set sys = '' %}{% set turns = messages %}{% endif %}{% for m in turns %}{{ '<start_of_turn>' + ('model' if m['role'] == 'assistant' else m['role']) + '\\n' + (((sys if loop.first else '') + m['content']) | trim) + '<end_of_turn>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}";

/// The template to use: `choice` (a built-in name or a Jinja file), else the model's own, else
/// a built-in by architecture.
pub fn choose(choice: Option<&str>, model_template: &str, arch: &str) -> Result<String> {
    match choice {
        Some("chatml") => Ok(CHATML.into()),
        Some("gemma") => Ok(GEMMA.into()),
        Some(path) => std::fs::read_to_string(path).map_err(|e| {
            Error::Template(format!(
                "chat template {path:?}: not a built-in (chatml, gemma) and not a readable file: {e}"
            ))
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
#[derive(Debug)]
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
            .map_err(|e| Error::Template(format!("the chat template does not parse: {e}")))?;
        Ok(Template { env, bos, eos })
    }

    /// The template for `model`: `choice` (see [`choose`]) or its own, with its BOS and EOS
    /// texts.
    pub fn for_model(model: &Model, choice: Option<&str>) -> Result<Template> {
        let info = model.info();
        let piece = |id: u32| {
            model
                .token_to_piece(id, true)
                .map(|b| String::from_utf8_lossy(b).into_owned())
                .unwrap_or_default()
        };
        let bos = if info.bos == u32::MAX { String::new() } else { piece(info.bos) };
        let eos = if info.eos == u32::MAX { String::new() } else { piece(info.eos) };
        Template::new(&choose(choice, &info.chat_template, &info.arch)?, bos, eos)
    }

    /// The conversation as the model expects it, ending with the assistant's turn opened.
    pub fn render(&self, messages: &[Message]) -> Result<String> {
        let t = self.env.get_template("chat").map_err(|e| Error::Template(e.to_string()))?;
        t.render(context! {
            messages => messages,
            add_generation_prompt => true,
            bos_token => self.bos,
            eos_token => self.eos,
        })
        .map_err(|e| Error::Template(format!("rendering the chat template: {e}")))
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
