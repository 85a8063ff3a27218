"""The audio-text retriever (CNext audio encoder, text encoder, projections), its mel front end, and LAION-CLAP."""
