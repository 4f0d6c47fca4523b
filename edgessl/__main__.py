from edgessl._entry import main

main()
