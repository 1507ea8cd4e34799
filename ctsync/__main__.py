from ctsync.cli.main import main

main()
