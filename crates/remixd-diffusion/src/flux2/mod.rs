//! FLUX.2 [klein]: the local engine's character-remix family.
//!
//! A flow-matching transformer that reads the prompt as the hidden states of a Qwen3
//! language model and the character and style images as extra tokens. Like the Stable
//! Diffusion modules, every piece is remixd's own, built from the diffusers directory's
//! config files and checked tensor for tensor against diffusers'
//! `Flux2KleinInpaintPipeline` on a tiny random-weight model.

pub mod prompt;
pub mod qwen3;
pub mod transformer;
