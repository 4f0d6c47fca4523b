from edgessl.cli import main

main()
