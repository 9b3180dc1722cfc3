from tlpipe.cli import main

main()
