"""Weight sharing through codebooks (Deep Compression): 1-D k-means (`kmeans`) and the codebook transform
(`codebook`), whose centroids can be fine-tuned with the summed gradients of the weights that share them; vector
k-means (`vkmeans`) and vector quantization (`vq`): codebooks of d-vectors of consecutive inputs, optionally summed
over residual stages, trained the same way."""
