//! Any bytes as a GGUF file: building a tokenizer from its metadata either fails with an error
//! or gives a tokenizer that tokenizes and detokenizes without panicking.
#![no_main]

use libfuzzer_sys::fuzz_target;
use unicorn_engine::gguf::GgufFile;
use unicorn_engine::tokenizer::Tokenizer;

fuzz_target!(|data: &[u8]| {
    let Ok(f) = GgufFile::from_bytes(data.to_vec()) else {
        return;
    };
    let Ok(tok) = Tokenizer::from_gguf(&f) else {
        return;
    };
    for text in ["Hello world 123 <|im_start|>", "", " \n\t é🦀"] {
        for (add, special) in [(false, false), (true, true)] {
            let ids = tok.tokenize(text, add, special);
            let mut d = tok.stream_decoder(true);
            for id in ids {
                assert!((id as usize) < tok.n_vocab());
                d.push(id).expect("valid id");
            }
            let _ = d.finish();
        }
    }
});
