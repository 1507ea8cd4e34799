from ctsync.cli.entry import main

main()
