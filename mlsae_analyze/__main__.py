from mlsae_analyze.cli import main

main()
