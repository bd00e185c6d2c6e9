from mlsae_train.cli import main

main()
