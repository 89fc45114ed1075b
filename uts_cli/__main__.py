from uts_cli.cli.app import main

main()
