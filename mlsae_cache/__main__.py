from mlsae_cache.cli import main

main()
