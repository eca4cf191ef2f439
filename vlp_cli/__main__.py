from vlp_cli.cli import main

main()
