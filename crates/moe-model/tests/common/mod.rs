//! Test helpers: a small model config, writing a Hugging Face Mixtral directory, and a naive f64 reference forward pass
//! of Mixtral written from the published definition, independent of the model and import code.

#![allow(dead_code)] // each test binary uses part of it

use std::collections::HashMap;
use std::path::Path;

use moe_core::MoeLayerConfig;
use moe_model::{FfnPlan, ModelConfig};
use safetensors::Dtype;
use safetensors::tensor::TensorView;

/// A small model of our own: GQA (4 query heads on 2 key/value heads), MoE blocks of 4 experts
/// with a shared expert, a 64-token vocabulary and a 32-token context.
pub fn small_config() -> ModelConfig {
    ModelConfig::new()
        .with_vocab_size(64)
        .with_d_model(32)
        .with_n_layers(2)
        .with_n_heads(4)
        .with_n_kv_heads(2)
        .with_d_ff(48)
        .with_max_seq_len(32)
        .with_ffn_plan(FfnPlan::EveryNth { n: 1 })
        .with_moe(MoeLayerConfig::new(32, 24, 4).with_n_shared_experts(1))
}

/// A tiny Mixtral's hyper-parameters.
#[derive(Clone, Copy)]
pub struct Mixtral {
    pub vocab: usize,
    pub d: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub f: usize,
    pub experts: usize,
    pub top_k: usize,
    pub theta: f64,
    pub eps: f64,
}

impl Mixtral {
    pub fn tiny() -> Self {
        Self {
            vocab: 50,
            d: 16,
            layers: 2,
            heads: 4,
            kv_heads: 2,
            f: 24,
            experts: 4,
            top_k: 2,
            theta: 10000.0,
            eps: 1e-5,
        }
    }

    fn hd(&self) -> usize {
        self.d / self.heads
    }

    /// Every tensor name with its HF shape.
    pub fn shapes(&self) -> Vec<(String, Vec<usize>)> {
        let (d, hd) = (self.d, self.hd());
        let mut v = vec![("model.embed_tokens.weight".to_string(), vec![self.vocab, d])];
        for i in 0..self.layers {
            let p = format!("model.layers.{i}");
            v.push((
                format!("{p}.self_attn.q_proj.weight"),
                vec![self.heads * hd, d],
            ));
            v.push((
                format!("{p}.self_attn.k_proj.weight"),
                vec![self.kv_heads * hd, d],
            ));
            v.push((
                format!("{p}.self_attn.v_proj.weight"),
                vec![self.kv_heads * hd, d],
            ));
            v.push((
                format!("{p}.self_attn.o_proj.weight"),
                vec![d, self.heads * hd],
            ));
            v.push((format!("{p}.input_layernorm.weight"), vec![d]));
            v.push((format!("{p}.post_attention_layernorm.weight"), vec![d]));
            v.push((
                format!("{p}.block_sparse_moe.gate.weight"),
                vec![self.experts, d],
            ));
            for j in 0..self.experts {
                let e = format!("{p}.block_sparse_moe.experts.{j}");
                v.push((format!("{e}.w1.weight"), vec![self.f, d]));
                v.push((format!("{e}.w3.weight"), vec![self.f, d]));
                v.push((format!("{e}.w2.weight"), vec![d, self.f]));
            }
        }
        v.push(("model.norm.weight".to_string(), vec![d]));
        v.push(("lm_head.weight".to_string(), vec![self.vocab, d]));
        v
    }

    /// Random weights (norm weights around 1), deterministic in the seed.
    pub fn random_weights(&self, seed: u64) -> HashMap<String, (Vec<usize>, Vec<f32>)> {
        let mut state = seed;
        let mut next = move || {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((state >> 33) as f64 / (1u64 << 31) as f64) as f32 * 2.0 - 1.0
        };
        self.shapes()
            .into_iter()
            .map(|(name, shape)| {
                let n: usize = shape.iter().product();
                let norm = name.ends_with("layernorm.weight") || name == "model.norm.weight";
                let values = (0..n)
                    .map(|_| {
                        if norm {
                            1.0 + 0.1 * next()
                        } else {
                            0.3 * next()
                        }
                    })
                    .collect();
                (name, (shape, values))
            })
            .collect()
    }

    pub fn config_json(&self, rope_nested: bool) -> String {
        let rope = if rope_nested {
            format!(
                r#""rope_parameters": {{"rope_theta": {}, "rope_type": "default"}}"#,
                self.theta
            )
        } else {
            format!(r#""rope_theta": {}"#, self.theta)
        };
        format!(
            r#"{{"architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "vocab_size": {}, "hidden_size": {},
 "intermediate_size": {}, "num_hidden_layers": {}, "num_attention_heads": {}, "num_key_value_heads": {},
 "num_local_experts": {}, "num_experts_per_tok": {}, "rms_norm_eps": {}, "max_position_embeddings": 64,
 "tie_word_embeddings": false, "torch_dtype": "float32", {rope}}}"#,
            self.vocab,
            self.d,
            self.f,
            self.layers,
            self.heads,
            self.kv_heads,
            self.experts,
            self.top_k,
            self.eps
        )
    }

    /// Writes an HF directory: one file, or `shards` files with an index; bf16 or f32.
    pub fn write_dir(
        &self,
        dir: &Path,
        weights: &HashMap<String, (Vec<usize>, Vec<f32>)>,
        shards: usize,
        bf16: bool,
        rope_nested: bool,
    ) {
        std::fs::create_dir_all(dir).unwrap();
        std::fs::write(dir.join("config.json"), self.config_json(rope_nested)).unwrap();
        let mut names: Vec<&String> = weights.keys().collect();
        names.sort();
        let encode = |v: &[f32]| -> Vec<u8> {
            if bf16 {
                v.iter()
                    .flat_map(|x| half::bf16::from_f32(*x).to_le_bytes())
                    .collect()
            } else {
                v.iter().flat_map(|x| x.to_le_bytes()).collect()
            }
        };
        let dtype = if bf16 { Dtype::BF16 } else { Dtype::F32 };
        let mut weight_map = serde_json::Map::new();
        for (s, chunk) in names.chunks(names.len().div_ceil(shards)).enumerate() {
            let file = if shards == 1 {
                "model.safetensors".to_string()
            } else {
                format!("model-{:05}-of-{:05}.safetensors", s + 1, shards)
            };
            let bytes: Vec<(String, Vec<usize>, Vec<u8>)> = chunk
                .iter()
                .map(|n| (n.to_string(), weights[*n].0.clone(), encode(&weights[*n].1)))
                .collect();
            let views: Vec<(String, TensorView)> = bytes
                .iter()
                .map(|(n, shape, b)| (n.clone(), TensorView::new(dtype, shape.clone(), b).unwrap()))
                .collect();
            std::fs::write(
                dir.join(&file),
                safetensors::serialize(views, None).unwrap(),
            )
            .unwrap();
            for n in chunk {
                weight_map.insert(n.to_string(), serde_json::Value::String(file.clone()));
            }
        }
        if shards > 1 {
            let index = serde_json::json!({"metadata": {}, "weight_map": weight_map});
            std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
        }
    }

    /// Reference logits `[seq][vocab]` for one sequence, in f64, straight from the HF tensors.
    pub fn reference_logits(
        &self,
        w: &HashMap<String, (Vec<usize>, Vec<f32>)>,
        tokens: &[usize],
        round_bf16: bool,
    ) -> Vec<Vec<f64>> {
        let get = |name: &str| -> Vec<f64> {
            w[name]
                .1
                .iter()
                .map(|x| {
                    if round_bf16 {
                        f64::from(half::bf16::from_f32(*x).to_f32())
                    } else {
                        f64::from(*x)
                    }
                })
                .collect()
        };
        // y = W x with W stored [out, in].
        let mv = |m: &[f64], x: &[f64], out: usize| -> Vec<f64> {
            let n = x.len();
            (0..out)
                .map(|o| (0..n).map(|i| m[o * n + i] * x[i]).sum())
                .collect()
        };
        let rms = |x: &[f64], g: &[f64]| -> Vec<f64> {
            let ms = x.iter().map(|v| v * v).sum::<f64>() / x.len() as f64;
            let r = 1.0 / (ms + self.eps).sqrt();
            x.iter().zip(g).map(|(v, g)| v * r * g).collect()
        };
        let silu = |v: f64| v / (1.0 + (-v).exp());
        let (d, hd, s) = (self.d, self.hd(), tokens.len());
        let emb = get("model.embed_tokens.weight");
        let mut x: Vec<Vec<f64>> = tokens
            .iter()
            .map(|&t| emb[t * d..(t + 1) * d].to_vec())
            .collect();
        let rope = |v: &mut [f64], pos: usize| {
            let half = hd / 2;
            for i in 0..half {
                let freq = 1.0 / self.theta.powf(2.0 * i as f64 / hd as f64);
                let (sn, cs) = (pos as f64 * freq).sin_cos();
                let (a, b) = (v[i], v[i + half]);
                v[i] = a * cs - b * sn;
                v[i + half] = b * cs + a * sn;
            }
        };
        for l in 0..self.layers {
            let p = format!("model.layers.{l}");
            let (wq, wk, wv, wo) = (
                get(&format!("{p}.self_attn.q_proj.weight")),
                get(&format!("{p}.self_attn.k_proj.weight")),
                get(&format!("{p}.self_attn.v_proj.weight")),
                get(&format!("{p}.self_attn.o_proj.weight")),
            );
            let g1 = get(&format!("{p}.input_layernorm.weight"));
            let hs: Vec<Vec<f64>> = x.iter().map(|t| rms(t, &g1)).collect();
            let mut q: Vec<Vec<f64>> = hs.iter().map(|h| mv(&wq, h, self.heads * hd)).collect();
            let mut k: Vec<Vec<f64>> = hs.iter().map(|h| mv(&wk, h, self.kv_heads * hd)).collect();
            let v: Vec<Vec<f64>> = hs.iter().map(|h| mv(&wv, h, self.kv_heads * hd)).collect();
            for pos in 0..s {
                for h in 0..self.heads {
                    rope(&mut q[pos][h * hd..(h + 1) * hd], pos);
                }
                for h in 0..self.kv_heads {
                    rope(&mut k[pos][h * hd..(h + 1) * hd], pos);
                }
            }
            let group = self.heads / self.kv_heads;
            for i in 0..s {
                let mut attn = vec![0.0; self.heads * hd];
                for h in 0..self.heads {
                    let kvh = h / group;
                    let scores: Vec<f64> = (0..=i)
                        .map(|j| {
                            (0..hd)
                                .map(|c| q[i][h * hd + c] * k[j][kvh * hd + c])
                                .sum::<f64>()
                                / (hd as f64).sqrt()
                        })
                        .collect();
                    let m = scores.iter().cloned().fold(f64::MIN, f64::max);
                    let ex: Vec<f64> = scores.iter().map(|s| (s - m).exp()).collect();
                    let z: f64 = ex.iter().sum();
                    for (j, e) in ex.iter().enumerate() {
                        for c in 0..hd {
                            attn[h * hd + c] += e / z * v[j][kvh * hd + c];
                        }
                    }
                }
                let o = mv(&wo, &attn, d);
                x[i].iter_mut().zip(o).for_each(|(a, b)| *a += b);
            }
            // Sparse MoE block: softmax over all experts, top-k, renormalise.
            let g2 = get(&format!("{p}.post_attention_layernorm.weight"));
            let gate = get(&format!("{p}.block_sparse_moe.gate.weight"));
            for xi in x.iter_mut() {
                let h = rms(xi, &g2);
                let logits = mv(&gate, &h, self.experts);
                let m = logits.iter().cloned().fold(f64::MIN, f64::max);
                let ex: Vec<f64> = logits.iter().map(|l| (l - m).exp()).collect();
                let z: f64 = ex.iter().sum();
                let mut order: Vec<usize> = (0..self.experts).collect();
                order.sort_by(|a, b| ex[*b].total_cmp(&ex[*a]));
                let top = &order[..self.top_k];
                let norm: f64 = top.iter().map(|&e| ex[e] / z).sum();
                for &e in top {
                    let ep = format!("{p}.block_sparse_moe.experts.{e}");
                    let (w1, w3, w2) = (
                        get(&format!("{ep}.w1.weight")),
                        get(&format!("{ep}.w3.weight")),
                        get(&format!("{ep}.w2.weight")),
                    );
                    let a = mv(&w1, &h, self.f);
                    let b = mv(&w3, &h, self.f);
                    let inner: Vec<f64> = a.iter().zip(&b).map(|(a, b)| silu(*a) * b).collect();
                    let y = mv(&w2, &inner, d);
                    let weight = ex[e] / z / norm;
                    xi.iter_mut().zip(y).for_each(|(o, y)| *o += weight * y);
                }
            }
        }
        let gn = get("model.norm.weight");
        let head = get("lm_head.weight");
        x.iter()
            .map(|t| mv(&head, &rms(t, &gn), self.vocab))
            .collect()
    }
}
