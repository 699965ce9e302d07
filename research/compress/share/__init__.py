"""Weight sharing through codebooks (Deep Compression): 1-D k-means (`kmeans`) and the codebook transform
(`codebook`), whose centroids can be fine-tuned with the summed gradients of the weights that share them."""
